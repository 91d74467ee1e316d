"""Zero-shot, continual fine-tuning, l2, EWC and WiSE-FT."""
from __future__ import annotations

from .base import Strategy, check_choice
from .parts import GuardTerm, WeightEnsemble, prefixed

L2_ANCHORS = {"pretrained": "initial", "previous": "previous"}  # l2's names -> GuardTerm's


class ZeroShot(Strategy):
    """No training: every row of R is the zero-shot vector z."""

    name = "zero-shot"
    trains = False

    def __init__(self):
        pass


class Finetune(Strategy):
    """Continual full fine-tuning with cross-entropy (the base behaviour)."""

    name = "finetune"

    def __init__(self):
        pass


class _Guarded(Strategy):
    """CE plus a guard term added after the CE backward (``parts.GuardTerm``)."""

    def setup(self, trainer):
        self.guard.setup(trainer)

    def after_backward(self, trainer, part):
        self.guard.apply(trainer)

    def after_task(self, trainer, t):
        self.guard.after_task(trainer, t)

    def state_dict(self):
        return {f"guard.{k}": v for k, v in self.guard.state_dict().items()}

    def load_state_dict(self, sd):
        self.guard.load_state_dict(prefixed(sd, "guard."))


class L2(_Guarded):
    """CE + lam * sum (theta - theta*)^2, lam = 1. ``anchor="pretrained"``
    (default, SPEC.md's "l2 to the pre-trained weights", the paper's table):
    theta* = the initial weights for the whole sequence; ``anchor="previous"``:
    theta* = the weights after the previous task (ZSCL's l2 script, ``--l2 1``
    with each task loading the previous checkpoint)."""

    name = "l2"

    def __init__(self, lam: float = 1.0, normalize=None, anchor: str = "pretrained"):
        check_choice(self.name, "anchor", anchor, L2_ANCHORS)
        self.guard = GuardTerm(self.name, "l2", lam=lam, normalize=normalize, anchor=L2_ANCHORS[anchor])


class EWC(_Guarded):
    """CE + lam * sum F (theta - theta*)^2 with F the Fisher diagonal from CE
    gradients at the end of each task, accumulated over tasks (none during the
    first task). ``normalize="mean"`` divides F by its per-tensor mean, so
    lam = 1 weighs like the l2 baseline; ``normalize=None`` uses the raw Fisher."""

    name = "ewc"

    def __init__(self, lam: float = 1.0, normalize="mean", fisher_batches: int = 10):
        self.guard = GuardTerm(self.name, "ewc", lam=lam, normalize=normalize, fisher_batches=fisher_batches)


class WiseFT(Strategy):
    """Fine-tune, then theta <- alpha * theta_new + (1 - alpha) * theta_prev after each task."""

    name = "wise-ft"

    def __init__(self, alpha: float = 0.8):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"wise-ft: alpha must be a number in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.ensemble = WeightEnsemble()

    def before_task(self, trainer, t):
        self.ensemble.start(trainer, 1.0 - self.alpha)

    def after_task(self, trainer, t):
        self.ensemble.add(trainer, self.alpha)
        self.ensemble.merge(trainer)
