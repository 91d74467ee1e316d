"""mgcl.retrieval: the memory bank, its builder, the question pool,
multi-stage retrieval and the Dynamic Siphon (SPEC.md sections 2-4).

    from mgcl.retrieval import build_bank, MemoryBank, load_pool, Siphon
    build_bank(["pmc_oa.jsonl"], "bank/", embedder="minilm")
    bank = MemoryBank.open("bank/")
    hits = bank.search(["chest x-ray with pneumothorax"], k=10)
    siphon = Siphon.from_bank("bank/", vlm=model, a=30, b=30, c=80, n_general=100, k_v=1, seed=0)
    refs = siphon.reference_set([task.finished() for task in done])   # mgcl.cl.Task -> FinishedTask

VLMs are passed in as objects (the ``mgcl.models`` protocol); this package
never imports ``mgcl.models`` or ``mgcl.cl``. Heavy dependencies
(sentence-transformers, faiss, pyarrow) load on first use.
"""
from .bank import BankError, BankFileMissing, Hit, MemoryBank, write_bank
from .build import build_bank
from .embedders import CachedEmbedder, HashingEmbedder, SentenceTransformerEmbedder, get_embedder
from .faiss_index import build_index
from .images import UnreadableImage, open_image
from .pool import Question, load_pool
from .rerank import retrieve
from .siphon import FinishedTask, ReferenceSet, Siphon

__all__ = ["MemoryBank", "BankError", "BankFileMissing", "Hit", "write_bank", "build_bank", "build_index",
           "get_embedder", "HashingEmbedder", "SentenceTransformerEmbedder", "CachedEmbedder", "open_image",
           "UnreadableImage", "Question", "load_pool", "retrieve", "Siphon", "ReferenceSet", "FinishedTask"]
