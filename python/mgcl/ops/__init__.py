"""The fused ops. Each lives in its own folder: ``__init__`` (checks, the
dispatch table, the torch.library op), ``reference.py`` (the definition),
``native.py`` (compiled paths) and, where it has one, ``triton.py``."""
OPS = ("fisher_guard", "contrastive_distill", "similarity_topk")
