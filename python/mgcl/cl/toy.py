"""Tiny generated image tasks (coloured shapes) for tests, demos and benches.

Every image shows one shape on a noisy background; each task asks about one
factor (the shape, its colour, its size or its side), so the tasks differ
and a small model learns each in a few hundred steps on a CPU. Images are
drawn on the fly from a per-item seed: deterministic, nothing on disk.
"""
from __future__ import annotations

import random
from typing import Optional

from .tasks import Task

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
SIZES = ("small", "large")
SIDES = ("left", "right")

# name, domain, factor, classes, templates
SPECS = (
    ("shape", "toy-shape", "shape", SHAPES, ("a photo of a {}.", "a drawing of a {}.")),
    ("colour", "toy-colour", "colour", tuple(COLOURS), ("a {} object.", "something coloured {}.")),
    ("size", "toy-size", "size", SIZES, ("a {} shape.", "a photo of a {} object.")),
    ("side", "toy-side", "side", SIDES, ("a shape on the {}.", "an object at the {}.")),
)


class ToyImages:
    """A map-style dataset of (PIL image, label) for one factor."""

    def __init__(self, factor: str, classes, n_per_class: int, image_size: int, seed: int):
        self.factor, self.classes, self.image_size, self.seed = factor, tuple(classes), image_size, seed
        self.labels = [c for c in range(len(self.classes)) for _ in range(n_per_class)]
        random.Random(seed).shuffle(self.labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = self.labels[i]
        rng = random.Random(self.seed * 1_000_003 + i)
        f = {"shape": rng.choice(SHAPES), "colour": rng.choice(tuple(COLOURS)), "size": rng.choice(SIZES),
             "side": rng.choice(SIDES)}
        f[self.factor] = self.classes[label]
        return draw(f, self.image_size, rng), label


def draw(f: dict, s: int, rng: random.Random):
    """The ``s`` x ``s`` image of factors ``f`` (shape, colour, size, side) on a noisy background."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    noise = bytes(rng.randrange(90, 140) for _ in range(s * s * 3))
    img = Image.frombytes("RGB", (s, s), noise)
    r = (0.16 if f["size"] == "small" else 0.3) * s * rng.uniform(0.9, 1.1)
    cx = (0.28 if f["side"] == "left" else 0.72) * s + rng.uniform(-0.05, 0.05) * s
    cy = rng.uniform(0.35, 0.65) * s
    box = [cx - r, cy - r, cx + r, cy + r]
    d = ImageDraw.Draw(img)
    col = COLOURS[f["colour"]]
    if f["shape"] == "circle":
        d.ellipse(box, fill=col)
    elif f["shape"] == "square":
        d.rectangle(box, fill=col)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    return img


class ToyGenerator:
    """A text-to-image generator (``mgcl.cl.generators.ImageGenerator``) for
    toy prompts: each factor a prompt names by its word ("a red circle", "a
    shape on the left.") is drawn so, the others at random; ``image_size``
    pixels square. Deterministic for (prompts, seed)."""

    name = "toy"

    def __init__(self, image_size: int = 32):
        self.image_size = image_size

    def generate(self, prompts, seed: int) -> list:
        out = []
        for k, p in enumerate(prompts):
            rng = random.Random(seed * 1_000_003 + k)
            words = set(p.lower().replace(".", " ").replace(",", " ").split())
            f = {}
            for factor, values in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", SIZES),
                                   ("side", SIDES)):
                named = [v for v in values if v in words]
                f[factor] = named[0] if named else rng.choice(values)
            out.append(draw(f, self.image_size, rng))
        return out


def toy_tasks(n_tasks: int = 4, *, n_train: int = 24, n_test: int = 12, image_size: int = 32, seed: int = 0,
              specs: Optional[tuple] = None) -> list[Task]:
    """``n_tasks`` tasks cycling through shape / colour / size / side (a repeated
    factor gets a new name and new images); ``n_train`` / ``n_test`` per class."""
    specs = specs or SPECS
    tasks = []
    for k in range(n_tasks):
        name, domain, factor, classes, templates = specs[k % len(specs)]
        if k >= len(specs):
            name = f"{name}{k // len(specs) + 1}"
        tasks.append(Task(name=name, domain=domain, classnames=list(classes), templates=list(templates),
                          train=ToyImages(factor, classes, n_train, image_size, seed * 100 + 2 * k),
                          test=ToyImages(factor, classes, n_test, image_size, seed * 100 + 2 * k + 1)))
    return tasks


def toy_vocabulary(tasks) -> list[str]:
    """Every prompt of every task (to build a TinyCLIP vocabulary)."""
    return [p for t in tasks for p in t.prompts(None)]
