"""Helpers for testing ops against their reference: tolerances by dtype,
input factories, and one comparison with readable failure messages."""
from __future__ import annotations

import torch

# dtype -> (rtol, atol) for comparing a fast path with the reference. fp32
# paths reorder sums (blocked / parallel reductions); 16-bit paths round each
# stored element to 8 (bf16) or 11 (fp16) mantissa bits.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def make_generator(seed: int = 0, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, *, dtype=torch.float32, device="cpu", seed=0, scale=1.0) -> torch.Tensor:
    """A seeded normal tensor made in float32 then cast (same values on any device)."""
    g = make_generator(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def odd_shapes(n: int, seed: int = 0, max_numel: int = 5000) -> list[tuple[int, ...]]:
    """``n`` shapes of rank 0-3 with sizes that are not powers of two."""
    g = make_generator(seed)
    shapes = []
    for i in range(n):
        rank = int(torch.randint(0, 4, (1,), generator=g))
        if rank == 0:
            shapes.append(())
            continue
        dims = []
        budget = max_numel
        for _ in range(rank):
            d = int(torch.randint(1, max(2, int(budget ** (1 / rank)) + 2), (1,), generator=g))
            if d > 1 and (d & (d - 1)) == 0:
                d += 1
            dims.append(d)
        shapes.append(tuple(dims))
    return shapes


def assert_matches_reference(actual, expected, *, dtype=None, rtol=None, atol=None, name="value") -> None:
    """Compare a fast path's output with the reference's under the dtype tolerance.

    NaN must appear in the same places; infinities must match exactly.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    dt = dtype or expected.dtype
    r, a = TOLERANCES.get(dt, TOLERANCES[torch.float32])
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    torch.testing.assert_close(
        actual.detach().cpu().to(torch.float64),
        expected.detach().cpu().to(torch.float64),
        rtol=rtol, atol=atol, equal_nan=True,
        msg=lambda m: f"{name} differs from the reference ({dt}, rtol={rtol}, atol={atol}):\n{m}",
    )


def distill_batch(B: int, d: int, dt: int | None = None, *, dtype=torch.float32, device="cpu", seed: int = 0,
                  teacher_noise: float = 0.5):
    """A reference batch for contrastive_distill: unit-norm student image/text
    features [B, d] whose pairs are correlated, and teacher features: a noisy
    copy of the student's (``dt`` None or d) or independent ones [B, dt]."""
    g = make_generator(seed)
    norm = torch.nn.functional.normalize

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    img = norm(rn(B, d), dim=1)
    txt = norm(img + 0.8 * rn(B, d), dim=1)
    if dt is None or dt == d:
        img_t = norm(img + teacher_noise * rn(B, d), dim=1)
        txt_t = norm(txt + teacher_noise * rn(B, d), dim=1)
    else:
        img_t = norm(rn(B, dt), dim=1)
        txt_t = norm(img_t + 0.8 * rn(B, dt), dim=1)
    return tuple(x.to(device=device, dtype=dtype) for x in (img, txt, img_t, txt_t))
