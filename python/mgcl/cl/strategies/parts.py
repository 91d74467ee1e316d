"""The parts strategies are composed of; each has the hooks of the step it
takes part in, and the strategy calls them from its own hooks.

- ``ReferenceDistillation``: distillation on a reference set (SPEC.md
  sections 4-5): where the set comes from (a Siphon, given or opened from a
  bank directory; "dynamic": rebuilt before each task from the finished tasks,
  or "uniform": one fixed set over domain keywords), the teacher ("last",
  "initial" or "avg" of the two), the loss (``mgcl.nn.PrimedLoss``: task CE +
  alpha CKT + beta CMC on the reference batch, pairs weighted by level), the
  reference loader's lifecycle (opened before a task, closed after it) and the
  teacher's features of the reference pairs, cached for the task when the
  pairs are deterministic (``TeacherCache``);
- ``GuardTerm``: the guard term of the step, dfg | ewc | l2 | none
  (``mgcl.FisherGuard``; SPEC.md section 6), its anchors moved to the weights
  after each task ("previous") or kept at the initial weights ("initial"), and
  EWC's Fisher estimated at the end of each task;
- ``WeightEnsemble``: the weights after a task replaced by a weighted mean of
  snapshots taken during it (ZSCL's averaging, WiSE-FT's interpolation).

PRIMED = reference distillation + guard term; ZSCL = reference distillation
(uniform set, initial teacher, CKT only) + l2 guard at the initial weights +
weight ensemble; l2 / EWC = a guard term; WiSE-FT = a weight ensemble.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...guard import FisherGuard
from .base import check_choice, check_lam, check_normalize, frozen_copy, kd_loss
from .refdata import Prefetch, ReferencePairs, images_checked, readable_pairs, reference_batches

TEACHERS = ("last", "initial", "avg")
SOURCES = ("dynamic", "uniform")
DIRECTIONS = {"both": (1.0, 1.0), "image": (1.0, 0.0), "text": (0.0, 1.0)}
GUARD_MODES = ("dfg", "ewc", "l2", "none")
ANCHORS = ("previous", "initial")


def prefixed(sd: dict, prefix: str) -> dict:
    """The entries of ``sd`` under ``prefix`` (a part's share of a strategy's state), prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _here(fn):
    """``fn()``, in a single-process run (a multi-process Siphon runs it on rank 0 and broadcasts)."""
    return fn()


class ReferenceDistillation:
    """Distillation on a reference set (module doc), for strategy ``who``.

    ``siphon`` (an object with ``reference_set(finished)`` and ``uniform_set(size,
    keywords)``, e.g. :class:`mgcl.retrieval.Siphon`) or ``bank`` (a bank
    directory, opened with ``Siphon.from_bank(bank, **siphon_options)`` at setup);
    ``source`` "dynamic" or "uniform" (``uniform_size`` pairs over
    ``uniform_keywords``, None: the taxonomy's); ``stages`` the retrieval
    pipeline of every query ("multi-stage", "dense-only", "bm25-only";
    ``mgcl.retrieval.rerank``); ``teacher``; the loss weights
    ``alpha`` (CKT) and ``beta`` (CMC), ``direction`` of CKT ("both", "image":
    rows, "text": columns); ``level_weights`` {level: weight}; ``batch_size`` of
    the reference batch (None: the task batch size); ``prefetch`` batches
    prepared ahead in a thread (0: none); ``backend`` of the loss op;
    ``cache_teacher``: keep the frozen teacher's features of each reference
    pair for the task (computed the first time the pair is drawn) when the pairs
    are deterministic (``refdata.is_deterministic`` of the student's eval
    transform, or a dataset's own ``deterministic`` attribute; otherwise the
    teacher runs every step).

    A reference set is a ``ReferenceSet`` (rows, decoded here) or a map-style
    dataset of ready ``(image tensor, caption, weight)`` pairs, used as it is.
    """

    def __init__(self, who: str, *, siphon=None, bank: Optional[str] = None, siphon_options: Optional[dict] = None,
                 source: str = "dynamic", uniform_size: int = 10000, uniform_keywords: Optional[list] = None,
                 teacher: str = "last", alpha: float = 1.0, beta: float = 0.25, direction: str = "both",
                 level_weights: Optional[dict] = None, batch_size: Optional[int] = None, prefetch: int = 2,
                 backend: Optional[str] = None, cache_teacher: bool = True, stages: str = "multi-stage"):
        from ...retrieval.rerank import PIPELINES  # noqa: PLC0415
        from ...retrieval.siphon import LEVELS  # noqa: PLC0415

        self.who = who
        self.source = check_choice(who, "retrieval", source, SOURCES)
        self.stages = check_choice(who, "stages", stages, PIPELINES)
        self.teacher = check_choice(who, "teacher", teacher, TEACHERS)
        self.direction = check_choice(who, "direction", direction, tuple(DIRECTIONS))
        if not alpha >= 0 or not beta >= 0:
            raise ValueError(f"{who}: the loss weights must be >= 0, got {alpha}, {beta}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 2):
            raise ValueError(f"{who}: ref_batch_size must be an integer >= 2, got {batch_size!r}")
        if isinstance(uniform_size, bool) or not isinstance(uniform_size, int) or uniform_size < 1:
            raise ValueError(f"{who}: uniform_size must be an integer >= 1, got {uniform_size!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"{who}: prefetch must be an integer >= 0, got {prefetch!r}")
        lw = dict(level_weights or {})
        bad = [k for k, v in lw.items() if k not in LEVELS or isinstance(v, bool) or not isinstance(v, (int, float))
               or not v >= 0]
        if bad:
            raise ValueError(f"{who}: level_weights must map levels {LEVELS} to numbers >= 0; bad: {bad}")
        if siphon_options is not None and not isinstance(siphon_options, dict):
            raise ValueError(f"{who}: siphon_options must be a mapping, got {siphon_options!r}")
        self.siphon, self.bank, self.siphon_options = siphon, bank, siphon_options
        self.uniform_size, self.uniform_keywords = uniform_size, uniform_keywords
        self.alpha, self.beta, self.level_weights = float(alpha), float(beta), lw
        self.batch_size, self.prefetch, self.backend = batch_size, prefetch, backend
        self.cache_teacher = bool(cache_teacher)
        self.cache: Optional[TeacherCache] = None
        self.loss = None
        self.initial = None        # the initial weights, for teacher "initial" / "avg"
        self.refset = None
        self.teacher_model = None
        self.batches = None

    def check(self, trainer) -> None:
        if self.siphon is None and self.bank is None:
            raise ValueError(f"{self.who}: needs a reference set: pass siphon=mgcl.retrieval.Siphon(...) or "
                             "bank=<bank dir>")

    def setup(self, trainer) -> None:
        from ...nn import PrimedLoss  # noqa: PLC0415

        i2t, t2i = DIRECTIONS[self.direction]
        self.loss = PrimedLoss(alpha=self.alpha, beta=self.beta, label_smoothing=trainer.train_config.label_smoothing,
                               i2t=i2t, t2i=t2i, backend=self.backend, gather=trainer.world > 1)
        if self.siphon is None:
            from ...retrieval import Siphon  # noqa: PLC0415

            self.siphon = Siphon.from_bank(self.bank, **(self.siphon_options or {}))
        if self.teacher in ("initial", "avg"):
            self.initial = [p.detach().clone() for p in trainer.params]
        if self.source == "uniform":
            self.refset = self.siphon.uniform_set(self.uniform_size, self.uniform_keywords, stages=self.stages)

    @torch.no_grad()
    def before_task(self, trainer, t: int) -> None:
        """The teacher, the task's reference set (dynamic) and its loader."""
        self.teacher_model = frozen_copy(trainer.model)
        if self.teacher != "last":
            named = dict(self.teacher_model.named_parameters())
            for name, p, p0 in zip(trainer.param_names, trainer.params, self.initial):
                named[name].copy_(p0 if self.teacher == "initial" else 0.5 * (p0 + p))
        if self.source == "dynamic":
            self.refset = self.siphon.reference_set([task.finished() for task in trainer.tasks[:t]],
                                                    stages=self.stages)
        if not isinstance(self.refset, torch.utils.data.Dataset):
            self.refset = self._readable(trainer, t)
        pairs = self.refset if isinstance(self.refset, torch.utils.data.Dataset) else \
            ReferencePairs(self.refset, trainer.model.transform(False), self.level_weights)
        cached = self.cache_teacher and getattr(pairs, "deterministic", False) is True
        self.cache = TeacherCache(len(pairs)) if cached else None
        teacher_note = "cached for the task" if cached else "recomputed every step" + (
            " (the reference pairs are not deterministic)" if self.cache_teacher else "")
        trainer.log(f"{self.who}: task {t + 1}: {self.refset!r}; teacher features {teacher_note}")
        stream = reference_batches(pairs, trainer.model.tokenize, self.batch_size or trainer.train_config.batch_size,
                                   seed=trainer.task_seed(t))
        self.batches = Prefetch(stream, self.prefetch) if self.prefetch else stream

    def _readable(self, trainer, t: int):
        """The task's reference set less its pairs without a readable image (logged);
        a BankError (one line, naming the bank) when none is left. In a run of
        several processes the check runs on rank 0 (the Siphon's) and its answer
        is broadcast, so every rank trains on one set."""
        from ...retrieval import BankError  # noqa: PLC0415

        refset, bank = self.refset, getattr(self.siphon, "bank", None)

        def check():  # (the pairs kept, or None for all; the reasons of those left out; the bank's name)
            where = f"bank {getattr(bank, 'path', '?')!r}"
            if len(refset) == 0 or images_checked(bank):  # every image opened at build time: no second decode
                return None, [], where
            kept, left_out = readable_pairs(refset)
            return (kept if left_out else None), left_out, where

        kept, left_out, where = getattr(self.siphon, "on_rank_zero", _here)(check)
        n = len(refset)
        if n == 0:
            raise BankError(f"{self.who}: task {t + 1}: the reference set is empty (nothing retrieved from {where}; "
                            "a bank built with --vlm or reranked by a VLM serves only entries with a readable image)")
        if left_out and not len(kept):
            raise BankError(f"{self.who}: task {t + 1}: none of the {n} reference pairs retrieved from {where} has "
                            f"a readable image (first: {left_out[0]}); rebuild the bank with `mgcl db build "
                            "--missing-images skip` or make its images readable")
        if left_out:
            trainer.log(f"{self.who}: task {t + 1}: left out {len(left_out)} of {n} reference pairs without a "
                        f"readable image (first: {left_out[0]})")
        return refset if kept is None else kept

    def __call__(self, trainer, logits: torch.Tensor, labels: torch.Tensor):
        """The loss of one step (``mgcl.nn.PrimedLossOutput``): the task ``logits`` and
        the next reference batch through the student and the (no-grad) teacher."""
        ref = trainer.shard(next(self.batches))    # several processes: this rank's pairs of the global batch
        dev = trainer.device
        images, tokens = ref.images.to(dev, non_blocking=True), ref.tokens.to(dev, non_blocking=True)
        m, teacher = trainer.model, self.teacher_model
        img_s, txt_s = m.encode_image(images).float(), m.encode_text(tokens).float()
        if self.cache is not None:
            img_t, txt_t = self.cache.features(teacher, ref.index, images, tokens)
        else:
            img_t, txt_t = teacher_features(teacher, images, tokens)
        with trainer.fp32():
            out = self.loss(logits.float(), labels, img_s, txt_s, img_t, txt_t, m.logit_scale.exp().float(),
                            teacher.logit_scale.exp().float(), ref.weights.to(dev))
        if trainer.world > 1:
            # gather=True: each rank's gradient is its share of the global loss's, the shares sum to it;
            # the trainer averages gradients over the ranks, so the distillation part is scaled by the world
            distill = out.distill * trainer.world
            out = out._replace(distill=distill, total=out.ce + distill)
        return out

    def after_task(self, trainer, t: int) -> None:
        if isinstance(self.batches, Prefetch):
            self.batches.close()
        self.batches = self.teacher_model = self.cache = None

    def state_dict(self) -> dict:
        return {f"initial.{i}": p for i, p in enumerate(self.initial)} if self.initial is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        if self.initial is not None:
            self.initial = [sd[f"initial.{i}"].to(p.device, p.dtype).clone() for i, p in enumerate(self.initial)]


@torch.no_grad()
def teacher_features(teacher, images: torch.Tensor, tokens: torch.Tensor):
    """The frozen teacher's float32 (image, text) features of a reference batch."""
    return teacher.encode_image(images).float(), teacher.encode_text(tokens).float()


class TeacherCache:
    """The frozen teacher's features of a task's ``n`` reference pairs, computed the
    first time a pair is drawn (in the batch that draws it, so a pass over the
    set costs one teacher forward per pair, then none) and kept for the task.
    Valid while the teacher and the pairs are fixed: a task, deterministic pairs."""

    def __init__(self, n: int):
        self.have = torch.zeros(n, dtype=torch.bool)
        self.img: Optional[torch.Tensor] = None
        self.txt: Optional[torch.Tensor] = None

    def features(self, teacher, index: torch.Tensor, images: torch.Tensor, tokens: torch.Tensor):
        """(image, text) features of the pairs at ``index`` (int64 [B], in the batch's order)."""
        missing = ~self.have[index]
        if bool(missing.any()):
            rows = missing.nonzero().squeeze(1)
            if bool(missing.all()):
                img, txt = teacher_features(teacher, images, tokens)
            else:
                img, txt = teacher_features(teacher, images[rows.to(images.device)], tokens[rows.to(tokens.device)])
            if self.img is None:
                n = len(self.have)
                self.img = img.new_empty((n,) + img.shape[1:])
                self.txt = txt.new_empty((n,) + txt.shape[1:])
            at = index[rows].to(self.img.device)
            self.img[at], self.txt[at] = img, txt
            self.have[index[rows]] = True
        at = index.to(self.img.device)
        return self.img[at], self.txt[at]


class GuardTerm:
    """The guard term of strategy ``who`` (module doc): ``mode`` dfg | ewc | l2 |
    none, ``lam``, ``normalize`` (None or "mean": W divided by its per-tensor
    mean), ``ema`` (dfg only), ``fisher_batches`` (ewc: batches of CE gradients
    for the Fisher at the end of each task, accumulated over tasks; no term
    during the first task), ``anchor`` "previous" or "initial". The
    ``mgcl.FisherGuard`` is ``fisher_guard`` (after setup; None for "none")."""

    def __init__(self, who: str, mode: str, *, lam: float = 1.0, normalize: Optional[str] = None, ema: float = 0.0,
                 fisher_batches: int = 10, anchor: str = "previous"):
        self.who = who
        self.mode = check_choice(who, "regularizer", mode, GUARD_MODES)
        self.anchor = check_choice(who, "anchor", anchor, ANCHORS)
        self.lam, self.normalize = check_lam(who, lam), check_normalize(who, normalize)
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0 \
                or (ema > 0 and mode != "dfg"):
            raise ValueError(f"{who}: ema must be in [0, 1) and applies to regularizer 'dfg' only, got {ema!r}")
        if isinstance(fisher_batches, bool) or not isinstance(fisher_batches, int) or fisher_batches < 1:
            raise ValueError(f"{who}: fisher_batches must be an integer >= 1, got {fisher_batches!r}")
        self.ema, self.fisher_batches = float(ema), fisher_batches
        self.fisher_guard: Optional[FisherGuard] = None

    def setup(self, trainer) -> None:
        if self.mode != "none":
            self.fisher_guard = FisherGuard(trainer.params, lam=self.lam, mode=self.mode, normalize=self.normalize,
                                     ema=self.ema)

    def apply(self, trainer) -> None:
        """Add the guard's gradient to every ``p.grad`` (call after the backward it reads); log the penalty."""
        if self.fisher_guard is None or (self.mode == "ewc" and self.fisher_guard.fisher is None):
            return  # none, or EWC during the first task (no Fisher yet)
        trainer.record(self.mode, self.fisher_guard.apply())

    def after_task(self, trainer, t: int) -> None:
        if self.fisher_guard is None:
            return
        if self.mode == "ewc":
            batches = trainer.loader(trainer.tasks[t].train, train=False, seed=trainer.task_seed(t) + 1,
                                     iters=self.fisher_batches)

            def ce(batch):
                images, labels = batch
                with trainer.autocast():
                    logits = trainer.task_logits(images.to(trainer.device), t)
                return trainer.ce(logits, labels.to(trainer.device))

            self.fisher_guard.estimate_fisher(ce, batches, accumulate=True)
        if self.anchor == "previous":
            self.fisher_guard.consolidate()

    def state_dict(self) -> dict:
        return dict(self.fisher_guard.state_dict()) if self.fisher_guard is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        if self.fisher_guard is not None:
            self.fisher_guard.load_state_dict(sd)


class WeightEnsemble:
    """theta <- the weighted mean of snapshots of the weights: ``start`` takes the
    first (weight ``w``), ``add`` another, ``merge`` writes the mean into the
    weights. A running mean, so it holds one copy of the weights."""

    def __init__(self):
        self.mean: Optional[list] = None
        self.total = 0.0

    @torch.no_grad()
    def start(self, trainer, w: float = 1.0) -> None:
        self.mean, self.total = [p.detach().clone() for p in trainer.params], float(w)

    @torch.no_grad()
    def add(self, trainer, w: float = 1.0) -> None:
        self.total += w
        for a, p in zip(self.mean, trainer.params):
            a.add_(p.detach() - a, alpha=w / self.total)

    @torch.no_grad()
    def merge(self, trainer) -> None:
        for p, a in zip(trainer.params, self.mean):
            p.copy_(a)
        self.mean, self.total = None, 0.0

    def state_dict(self) -> dict:
        """The running mean during a task (a mid-task checkpoint); empty between tasks."""
        if self.mean is None:
            return {}
        return {"total": self.total, **{f"mean.{i}": a for i, a in enumerate(self.mean)}}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if "total" not in sd:
            return  # between tasks: before_task starts the ensemble
        self.total = float(sd["total"])
        for i, a in enumerate(self.mean):
            a.copy_(sd[f"mean.{i}"])


def teacher_text_kd(trainer, images, teacher, teacher_text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation against fixed teacher text embeddings, as ZSCL's code does it
    (its ``distillation`` on both axes, ``--image_loss --text_loss``): the student's
    and the teacher's unit image features of ``images`` [B] scored (each model's
    logit scale) against ``teacher_text`` [N, d], the teacher's unit text
    embeddings, so the student's text tower gets no gradient from it; KD
    (``base.kd_loss``, KL(teacher || student) at ``temperature``, times T^2) over
    the N texts of each image plus over the B images of each text."""
    s = trainer.logits(trainer.image_features(images), teacher_text)
    with torch.no_grad():
        t = trainer.logits(trainer.image_features(images, model=teacher), teacher_text, model=teacher)
    return kd_loss(s, t, temperature) + kd_loss(s.T, t.T, temperature)


__all__ = ["ReferenceDistillation", "TeacherCache", "teacher_features", "GuardTerm", "WeightEnsemble",
           "teacher_text_kd", "TEACHERS", "SOURCES", "DIRECTIONS", "GUARD_MODES", "ANCHORS", "prefixed"]
