"""GIFT (Wu et al., CVPR 2025, "Synthetic Data is an Elegant GIFT for Continual
Vision-Language Models"), as its public code (``Luo-Jiaming/GIFT_CL``:
``src/models/finetune_gift.py``, ``configs/mtil_order_*.json``,
``txt2img.py``) does it.

Reference set: before task t, ``images_per_task`` prompts (GIFT: 1,000) drawn
uniformly with replacement from a pool that grows task by task: the base
prompts, for what the model was pretrained on (GIFT's ImageNet class
prompts, in its pool for every task), then the class prompts (template 0) of
each finished task. ``base_prompts``: a list, "pool" for the texts of mgcl's
built-in question pool (medical labels over every domain), or None for the
generator's own if it has any (with no base prompt the first task, which has
nothing to replay, trains on cross-entropy alone). One image each from a text-to-image generator
(``mgcl.cl.generators``: a registered name, such as the procedural
``"mgtil-synth"`` its benchmark package registers, ``"diffusers:<dir>"`` or any
object of the protocol), blank images dropped. The pairs go through
the student's eval transform (GIFT: the test preprocess). Batches of
``ref_batch_size`` pairs (None: the task batch size, as GIFT's), reshuffled
every pass.

One step, with S / T the student / teacher similarity matrices of the
reference batch at the (frozen, shared) logit scale, the teacher the model
after the previous task (``ref_model: load``)::

    distill = KL_T(T rows || S rows) + KL_T(T cols || S cols)     (each * T^2, T = 2)
    ita     = CE(S, Y) + CE(S^T, Y)      (soft targets Y, label smoothing of the run)
    part 0  = distill_w * distill + ita_w * ita                     (1 and 0.25)
    AWC     : W = g^2 / mean(g^2) per tensor, g = d(part 0)/dp, recomputed every
              step; p.grad += 2 * l2 * W * (p - p*), p* = the weights after the
              previous task (the guard op's dfg mode, normalize="mean"; l2 = 1)
    part 1  = CE of the task batch

``Y[i, j] = 1 / #{k : prompt_k = prompt_i}`` when pairs i and j share their
prompt (prompts are compared by their tokens), so duplicates are joint
positives. GIFT's distillation is a soft cross-entropy, the KL plus the
teacher's entropy: the same gradient; the logged ``distill`` is the KL.
Where GIFT's code and paper differ, the code is followed: the ITA term
carries the run's label smoothing (its ``--ls`` on both CE calls) and the
teacher is the previous model (``ref_model: load``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...nn import ContrastiveDistillLoss
from .base import Loss, Strategy, TaskBatch, frozen_copy
from .parts import GuardTerm, prefixed
from .refdata import Prefetch, reference_batches


def duplicate_targets(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` soft targets: row i spread evenly over the pairs whose tokens equal pair i's."""
    same = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1).float()
    return same / same.sum(dim=1, keepdim=True)


class Gift(Strategy):
    name = "gift"

    def __init__(self, generator="mgtil-synth", images_per_task: int = 1000, base_prompts: Optional[list] = None,
                 distill: float = 1.0, ita: float = 0.25, l2: float = 1.0, temperature: float = 2.0,
                 ref_batch_size: Optional[int] = None, prefetch: int = 2, backend: Optional[str] = None):
        for key, v in (("distill", distill), ("ita", ita), ("l2", l2)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"gift: {key} must be a finite number >= 0, got {v!r}")
        if distill == 0 and ita == 0:
            raise ValueError("gift: distill and ita are both 0: AWC needs a distillation gradient")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"gift: temperature must be a number > 0, got {temperature!r}")
        if isinstance(images_per_task, bool) or not isinstance(images_per_task, int) or images_per_task < 2:
            raise ValueError(f"gift: images_per_task must be an integer >= 2, got {images_per_task!r}")
        if ref_batch_size is not None and (isinstance(ref_batch_size, bool) or not isinstance(ref_batch_size, int)
                                           or ref_batch_size < 2):
            raise ValueError(f"gift: ref_batch_size must be an integer >= 2, got {ref_batch_size!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"gift: prefetch must be an integer >= 0, got {prefetch!r}")
        if base_prompts is not None and base_prompts != "pool" and (
                isinstance(base_prompts, str) or not all(isinstance(p, str) for p in base_prompts)):
            raise ValueError(f"gift: base_prompts must be None, 'pool' or a list of prompt strings, "
                             f"got {base_prompts!r}")
        self.generator_spec = generator
        self.generator = None                     # resolved at check (a diffusers pipeline loads there)
        self.images_per_task, self.base_prompts = images_per_task, base_prompts
        self.distill, self.ita, self.temperature = float(distill), float(ita), float(temperature)
        self.ref_batch_size, self.prefetch = ref_batch_size, prefetch
        self.guard = GuardTerm(self.name, "dfg", lam=l2, normalize="mean")
        # KL at temperature T: the scales divided by T, the term times T^2; no CMC (ITA has soft targets)
        self.kd = ContrastiveDistillLoss(kd=self.distill * self.temperature ** 2, cmc=0.0, backend=backend)
        self.teacher = self.batches = None

    def check(self, trainer):
        from ..generators import resolve  # noqa: PLC0415

        self.generator = resolve(self.generator_spec)
        if hasattr(self.generator, "check_prompts"):   # every prompt it will be asked for, before any training
            self.generator.check_prompts(self.pool(trainer, len(trainer.tasks) - 1))

    def setup(self, trainer):
        self.guard.setup(trainer)

    def pool(self, trainer, t: int) -> list:
        """The prompts replayed before task t: the base prompts ("pool": the texts of the
        built-in question pool) and the finished tasks' class prompts (template 0)."""
        if self.base_prompts == "pool":
            from ...retrieval.pool import load_pool  # noqa: PLC0415

            base = [q.text for q in load_pool()]
        else:
            base = list(self.base_prompts if self.base_prompts is not None
                        else getattr(self.generator, "base_prompts", None) or [])
        return base + [p for task in trainer.tasks[:t] for p in task.prompts(0)]

    def before_task(self, trainer, t):
        from ..generators import synthetic_pairs  # noqa: PLC0415

        pool = self.pool(trainer, t)
        if not pool:
            trainer.log(f"gift: task {t + 1}: no prompts to replay (no base prompts): cross-entropy only")
            return
        self.teacher = frozen_copy(trainer.model)
        pairs = synthetic_pairs(self.generator, pool, self.images_per_task, trainer.task_seed(t),
                                trainer.model.transform(False), progress=trainer.progress,
                                desc=f"gift: task {t + 1} images")
        trainer.log(f"gift: task {t + 1}: {pairs!r} from {self.generator.name}")
        stream = reference_batches(pairs, trainer.model.tokenize,
                                   self.ref_batch_size or trainer.train_config.batch_size, seed=trainer.task_seed(t))
        self.batches = Prefetch(stream, self.prefetch) if self.prefetch else stream

    def replay_loss(self, trainer, images: torch.Tensor, tokens: torch.Tensor):
        """``(distill_w * distill + ita_w * ita, distill_w * distill, ita)`` of one reference batch (module doc)."""
        m, teacher = trainer.model, self.teacher
        img_s, txt_s = m.encode_image(images), m.encode_text(tokens)
        with torch.no_grad():
            img_t, txt_t = teacher.encode_image(images), teacher.encode_text(tokens)
        with trainer.fp32():
            scale_s, scale_t = m.logit_scale.exp().float(), teacher.logit_scale.exp().float()
            T = self.temperature
            kd = self.kd(img_s.float(), txt_s.float(), img_t.float(), txt_t.float(), scale_s / T, scale_t / T)
            S = scale_s * F.normalize(img_s.float(), dim=-1) @ F.normalize(txt_s.float(), dim=-1).T
            Y = duplicate_targets(tokens)
            ls = trainer.train_config.label_smoothing
            ita = F.cross_entropy(S, Y, label_smoothing=ls) + F.cross_entropy(S.T, Y, label_smoothing=ls)
            return kd + self.ita * ita, kd, ita

    def training_loss(self, trainer, batch: TaskBatch) -> Loss:
        ce = trainer.ce(trainer.task_logits(batch.images, batch.task), batch.labels)
        if self.batches is None:
            return Loss([ce], {"ce": ce})
        ref = next(self.batches)
        dev = trainer.device
        part, distill, ita = self.replay_loss(trainer, ref.images.to(dev, non_blocking=True),
                                              ref.tokens.to(dev, non_blocking=True))
        return Loss([part, ce], {"ce": ce, "distill": distill, "ita": ita})

    def after_backward(self, trainer, part):
        if part == 0 and self.batches is not None:
            self.guard.apply(trainer)  # AWC: between the replay and the CE backward

    def after_task(self, trainer, t):
        if isinstance(self.batches, Prefetch):
            self.batches.close()
        self.batches = self.teacher = None
        self.guard.after_task(trainer, t)

    def options(self) -> dict:
        opts = super().options()
        if not isinstance(self.generator_spec, str):
            opts["generator"] = getattr(self.generator_spec, "name", opts["generator"])
        return opts

    def state_dict(self):
        return {f"guard.{k}": v for k, v in self.guard.state_dict().items()}

    def load_state_dict(self, sd):
        self.guard.load_state_dict(prefixed(sd, "guard."))
