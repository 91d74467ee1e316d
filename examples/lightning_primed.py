"""PRIMED in Lightning: the guarded step with manual optimisation and accumulation.

mgcl's TinyCLIP (random init) trains on a toy task with CE + alpha CKT + beta
CMC on reference pairs and the Dynamic Fisher Guard, through
mgcl.integrations.lightning.GuardedModule. Offline, CPU, seconds:

    python examples/lightning_primed.py --steps 20 --accumulate 2 --out /tmp/lightning-primed

ce, ckt, cmc, distill and the guard penalty are logged with self.log (a CSV
file under --out).
"""
import warnings

import lightning as L
import torch
from _data import arguments, setup

from mgcl.integrations.lightning import GuardedModule
from mgcl.models import TinyCLIP, WordTokenizer


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
    args = arguments(__doc__, "lightning-primed-out", "batches per optimizer step")

    student, losses, data = setup(tiny_clip)
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
