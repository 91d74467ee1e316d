"""The harness behind ``mgcl bench`` and ``benches/``: one module per op
(``mgcl.bench.<op>``) exposing ``run(device, scale, repeats) -> dict`` and
``table(result) -> str``; shared timing, memory and machine helpers in
``harness``."""
BENCHES = ("fisher_guard", "contrastive_distill", "similarity_topk", "retrieval", "step", "cleanse")
