"""Text-to-image generators for synthetic replay (the ``gift`` strategy).

The protocol, :class:`ImageGenerator`: an object with

- ``name`` (str): what the run log and ``options()`` call it;
- ``generate(prompts, seed) -> list[PIL.Image.Image]``: one RGB image per
  prompt, deterministic for (``prompts``, ``seed``);
- optionally ``base_prompts`` (a sequence of str): prompts for what the model
  was pretrained on, the replay pool of the first task (GIFT's first task
  replays the pretraining classes, ImageNet's, since no earlier task exists);
- optionally ``check_prompts(prompts)``: ValueError naming the prompts it
  cannot draw (a strategy calls it before any training).

By spec string (:func:`resolve`) (and ``mgcl.cl.toy.ToyGenerator`` for the
toy tasks of the tests):

- a registered name (``REGISTRY``, filled by :func:`register`): a benchmark
  package registers the generators of its own benchmarks when it is imported
  (the SYNTHETIC benchmark's procedural renderer as ``"mgtil-synth"``), so
  this layer names none of them;
- ``"diffusers:<dir>"``: :class:`DiffusersGenerator`, any ``diffusers``
  text-to-image pipeline saved in a local directory (``pip install
  mgcl[diffusers]``; nothing is downloaded).

:func:`synthetic_pairs` turns prompts into the reference pairs the strategy
trains on: ``n`` prompts drawn uniformly with replacement from the pool (as
GIFT's ``txt2img.py`` samples them, so prompts repeat), one image each, all-black
images dropped (a pipeline's safety checker blanks what it refuses; GIFT's
dataset skips them).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

# name -> factory (no arguments, returns an ImageGenerator), called when resolved; see ``register``
REGISTRY: dict = {}


@runtime_checkable
class ImageGenerator(Protocol):
    """Prompts in, images out (module doc)."""

    name: str

    def generate(self, prompts: Sequence[str], seed: int) -> list: ...


def register(name: str, factory: Callable[[], ImageGenerator]) -> None:
    """Make ``resolve(name)`` return ``factory()``. A name registered again is
    replaced; ``"diffusers:..."`` names are taken by :class:`DiffusersGenerator`."""
    if not isinstance(name, str) or not name or name.startswith("diffusers:"):
        raise ValueError(f"generators.register: the name must be a non-empty string not starting with "
                         f"'diffusers:', got {name!r}")
    if not callable(factory):
        raise ValueError(f"generators.register: {name!r}: the factory must be callable, got {type(factory).__name__}")
    REGISTRY[name] = factory


def resolve(spec) -> ImageGenerator:
    """A generator from ``spec``: an :class:`ImageGenerator` as it is, a
    registered name (``REGISTRY``) or ``"diffusers:<dir>"``; ValueError otherwise."""
    if not isinstance(spec, str):
        if not isinstance(spec, ImageGenerator):
            raise ValueError(f"generator: expected a name, 'diffusers:<dir>' or an object with name and "
                             f"generate(prompts, seed), got {type(spec).__name__}")
        return spec
    if spec.startswith("diffusers:"):
        return DiffusersGenerator(spec[len("diffusers:"):])
    if spec not in REGISTRY:
        raise ValueError(f"generator: unknown generator {spec!r}; registered: {', '.join(REGISTRY) or 'none'} "
                         "(a benchmark package registers its own when imported), or 'diffusers:<local pipeline dir>'")
    return REGISTRY[spec]()


class DiffusersGenerator:
    """A ``diffusers`` text-to-image pipeline loaded from the local directory
    ``path`` (``DiffusionPipeline.from_pretrained(path, local_files_only=True)``:
    any pipeline class whose call takes prompts and returns ``.images``, e.g.
    Stable Diffusion v1.5 as GIFT uses it). ``steps`` denoising steps (GIFT:
    50), ``guidance_scale`` (None: the pipeline's default), ``batch`` prompts
    per pipeline call, ``device`` (None: CUDA when available) and ``dtype``
    (None: float16 on CUDA, float32 on the CPU). Image k of a call is drawn
    from a torch generator seeded ``seed + k``."""

    def __init__(self, path: str, *, steps: int = 50, guidance_scale: Optional[float] = None, batch: int = 8,
                 device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        if not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"DiffusersGenerator: {path!r} is not a directory (a saved diffusers pipeline: "
                             "model_index.json and its component folders)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"DiffusersGenerator: steps must be an integer >= 1, got {steps!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"DiffusersGenerator: batch must be an integer >= 1, got {batch!r}")
        try:
            from diffusers import DiffusionPipeline  # noqa: PLC0415
        except ImportError:
            raise ValueError("DiffusersGenerator needs the diffusers package: pip install mgcl[diffusers]") from None
        self.path = os.path.abspath(os.path.expanduser(path))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        try:
            # newer diffusers rename torch_dtype to dtype (with a FutureWarning); older ones know only torch_dtype
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = DiffusionPipeline.from_pretrained(self.path, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ValueError(f"DiffusersGenerator: cannot load a pipeline from {self.path}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        self.pipeline = pipe.to(self.device)
        self.steps, self.guidance_scale, self.batch = steps, guidance_scale, batch
        self.name = f"diffusers:{self.path}"

    def generate(self, prompts: Sequence[str], seed: int) -> list:
        extra = {} if self.guidance_scale is None else {"guidance_scale": float(self.guidance_scale)}
        out = []
        for s in range(0, len(prompts), self.batch):
            chunk = list(prompts[s:s + self.batch])
            gens = [torch.Generator(self.device).manual_seed(seed + s + k) for k in range(len(chunk))]
            with torch.no_grad():
                images = self.pipeline(chunk, generator=gens, num_inference_steps=self.steps, output_type="pil",
                                       **extra).images
            out.extend(im.convert("RGB") for im in images)
        return out

    def __repr__(self) -> str:
        return f"DiffusersGenerator({self.path!r}, steps={self.steps}, device={str(self.device)!r})"


class SyntheticPairs(torch.utils.data.Dataset):
    """Generated reference pairs: item i = (``transform(image_i)``, ``prompt_i``,
    1.0), the shape ``mgcl.cl.strategies.refdata.reference_batches`` takes."""

    def __init__(self, images: list, prompts: list, transform: Callable, dropped: int = 0):
        self.images, self.prompts, self.transform, self.dropped = images, prompts, transform, dropped

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.prompts[i], 1.0

    def __repr__(self) -> str:
        return (f"SyntheticPairs({len(self)} images of {len(set(self.prompts))} distinct prompts"
                + (f", {self.dropped} blank images dropped" if self.dropped else "") + ")")


def _blank(image) -> bool:
    return image.getbbox() is None  # every pixel zero


def synthetic_pairs(generator: ImageGenerator, pool: Sequence[str], n: int, seed: int, transform: Callable, *,
                    chunk: int = 64, progress: bool = False, desc: str = "generating") -> SyntheticPairs:
    """``n`` prompts drawn uniformly with replacement from ``pool`` (a torch
    generator seeded ``seed``), an image each from ``generator`` (chunk k of
    ``chunk`` prompts seeded ``seed * 1_000_003 + k * chunk``), blank images dropped."""
    pool = list(pool)
    if not pool:
        raise ValueError("synthetic_pairs: the prompt pool is empty")
    pick = torch.randint(len(pool), (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    prompts = [pool[i] for i in pick]
    from tqdm.auto import tqdm  # noqa: PLC0415

    images, kept, dropped = [], [], 0
    for s in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False):
        part = prompts[s:s + chunk]
        made = generator.generate(part, seed * 1_000_003 + s)
        if len(made) != len(part):
            raise RuntimeError(f"generator {generator.name!r}: {len(made)} images for {len(part)} prompts")
        for image, prompt in zip(made, part):
            image = image.convert("RGB")
            if _blank(image):
                dropped += 1
                continue
            images.append(image)
            kept.append(prompt)
    if not images:
        raise RuntimeError(f"generator {generator.name!r}: every one of {n} images was blank")
    return SyntheticPairs(images, kept, transform, dropped)


__all__ = ["ImageGenerator", "DiffusersGenerator", "SyntheticPairs", "synthetic_pairs", "resolve", "register", "REGISTRY"]
