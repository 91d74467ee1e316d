"""PRIMED in Lightning: the guarded step with manual optimisation and accumulation.

mgcl's TinyCLIP (random init) trains on a toy task with CE + alpha CKT + beta
CMC on reference pairs and the Dynamic Fisher Guard, through
mgcl.integrations.lightning.GuardedModule. Offline, CPU, seconds:

    python examples/lightning_primed.py --steps 20 --accumulate 2 --out /tmp/lightning-primed

ce, ckt, cmc, distill and the guard penalty are logged with self.log (a CSV
file under --out).
"""
import argparse
import warnings

import lightning as L
import torch
from _data import setup

from mgcl.integrations import PrimedLosses
from mgcl.integrations.lightning import GuardedModule
from mgcl.models import TinyCLIP, WordTokenizer
from mgcl.nn import PrimedLoss


def tiny_clip(vocabulary):
    torch.manual_seed(0)
    return TinyCLIP(WordTokenizer.build(vocabulary, context_length=16), vision="cnn", image_size=32,
                    vision_width=16, text_width=16, text_heads=2, text_layers=1, embed_dim=16)


class Primed(GuardedModule, L.LightningModule):
    def __init__(self, student, losses, lam, accumulate):
        super().__init__()
        self.student, self.primed = student, losses
        self.guard = {"lam": lam, "mode": "dfg", "normalize": "mean"}
        self.accumulate = accumulate
        self.clip_grad_norm = 1.0

    def compute_losses(self, batch):
        return self.primed(self.student, batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.student.parameters(), lr=1e-4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--accumulate", type=int, default=2, help="batches per optimizer step")
    ap.add_argument("--batch-size", type=int, default=4, help="task batch size")
    ap.add_argument("--lam", type=float, default=1.0, help="guard strength lambda")
    ap.add_argument("--out", default="lightning-primed-out", help="output folder (CSV log)")
    args = ap.parse_args()

    student, teacher, class_tokens, refs, data = setup(tiny_clip)
    losses = PrimedLosses(teacher, class_tokens, refs, PrimedLoss(alpha=1.0, beta=0.25, label_smoothing=0.2))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, log_every_n_steps=1,
                        logger=L.pytorch.loggers.CSVLogger(args.out, name="primed"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Primed(student, losses, args.lam, args.accumulate), loader)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"after {trainer.global_step} steps: ce {m['ce']:.4f} ckt {m['ckt']:.4f} cmc {m['cmc']:.4f} "
          f"penalty {m['penalty']:.3g}")
    print(f"wrote {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
