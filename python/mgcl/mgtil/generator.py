"""The procedural text-to-image generator of mgtil-synth (SYNTHETIC images):
the ``mgcl.cl.generators.ImageGenerator`` behind ``generator="mgtil-synth"``
(registered by ``mgcl.mgtil``'s ``__init__``: the cl layer names no benchmark).

A prompt names what to draw:

- any class prompt of the benchmark's tasks (every template, every class:
  ``"a chest x-ray showing pleural effusion."``) draws that class's finding
  with the renderer of the task's domain, as ``mgcl.mgtil.synth`` draws the
  task images (without the task's acquisition shift, which a text-to-image
  model would not know either);
- the ``base_prompts``, one per finding of each of the eight corpus domains
  (``"chest radiograph showing a pulmonary nodule."``), stand for what the
  demo's model was pretrained on, the replay pool of the first task (GIFT's
  ImageNet class prompts).

Any other prompt is an error naming it. Images are 64x64 RGB, deterministic
for (prompts, seed).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .benchmarks import SYNTH_TASKS
from .synth import DOMAINS, render


def _prompt_table() -> tuple[dict, list]:
    """prompt -> (domain, finding) for every class prompt and base prompt; the base prompts in order."""
    table = {}
    for t in SYNTH_TASKS:
        for template in t.templates:
            for classname, finding in t.classes:
                table[template.format(classname)] = (t.domain, finding)
    base = []
    for name, d in DOMAINS.items():
        for finding, (phrases, _) in d.findings.items():
            p = f"{d.modalities[0]} showing {phrases[0]}."
            table.setdefault(p, (name, finding))
            base.append(p)
    return table, base


class SynthGenerator:
    """Procedural images for mgtil-synth prompts (module doc)."""

    name = "mgtil-synth"

    def __init__(self):
        self.table, self.base_prompts = _prompt_table()

    def check_prompts(self, prompts: Sequence[str]) -> None:
        unknown = sorted({p for p in prompts if p not in self.table})
        if unknown:
            raise ValueError(f"mgtil-synth generator: cannot draw {unknown[:3]}: not a class prompt of mgtil-synth "
                             "nor one of its base prompts")

    def generate(self, prompts: Sequence[str], seed: int) -> list:
        from PIL import Image  # noqa: PLC0415

        self.check_prompts(prompts)
        out: list = [None] * len(prompts)
        by_domain: dict = {}
        for i, p in enumerate(prompts):
            by_domain.setdefault(self.table[p][0], []).append(i)
        for k, (domain, rows) in enumerate(sorted(by_domain.items())):
            images = render(domain, np.array([self.table[prompts[i]][1] for i in rows]), (int(seed), k))
            for i, im in zip(rows, images):
                out[i] = Image.fromarray(im, "RGB")
        return out

    def __repr__(self) -> str:
        return f"SynthGenerator({len(self.table)} prompts)"


__all__ = ["SynthGenerator"]
