"""Procedural images for mgtil-synth (SYNTHETIC, not medical images): numpy
primitives vectorised over a batch of 64x64 images, and one renderer per
domain, ``render_<domain>(rng, findings) -> float RGB [n, 64, 64, 3]`` (values
about [0, 1]; the caller clips and quantises). ``findings`` is an array of
finding keys, one per image; every random draw is made for the whole batch, so
a renderer is deterministic for its RNG state and batch.

Each renderer draws the shared anatomy of its domain (what makes images of one
domain look alike) with per-image variation, then the findings as small local
details. Findings that only some images have are computed on those rows only.
"""
from __future__ import annotations

import math

import numpy as np

SIZE = 64
H = W = SIZE
_YY, _XX = np.meshgrid(np.arange(H, dtype=np.float32) / (H - 1), np.arange(W, dtype=np.float32) / (W - 1),
                       indexing="ij")
_FY = np.fft.fftfreq(H).astype(np.float32)[:, None]   # cycles per pixel
_FX = np.fft.rfftfreq(W).astype(np.float32)[None, :]


# ---- primitives (all over a batch: arrays [n, H, W]) -------------------------------------

def _col(a) -> np.ndarray:
    """[n] -> [n, 1, 1] float32, to broadcast a per-image value over pixels."""
    return np.asarray(a, np.float32).reshape(-1, 1, 1)


def _sig(z):
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _gauss_hat(sa, sb=None, theta=None) -> np.ndarray:
    """Fourier transform (rfft2 grid) of a peak-1 Gaussian with std ``sa`` pixels
    along direction ``theta`` (x right, y down) and ``sb`` across it; per image.
    Continuous FT of exp(-x^2/2s^2) is s*sqrt(2 pi)*exp(-2 pi^2 s^2 u^2), u in cycles/pixel."""
    sa = np.atleast_1d(np.asarray(sa, np.float32))
    sb = sa if sb is None else np.atleast_1d(np.asarray(sb, np.float32))
    th = np.zeros_like(sa) if theta is None else np.atleast_1d(np.asarray(theta, np.float32))
    c, s = _col(np.cos(th)), _col(np.sin(th))
    ua, ub = c * _FX + s * _FY, -s * _FX + c * _FY
    sa, sb = _col(sa), _col(sb)
    return (2 * np.pi * sa * sb) * np.exp(-2 * np.pi ** 2 * (sa ** 2 * ua ** 2 + sb ** 2 * ub ** 2))


def _conv(img: np.ndarray, khat: np.ndarray) -> np.ndarray:
    return np.fft.irfft2(np.fft.rfft2(img) * khat, s=(H, W)).astype(np.float32)


def _splat(n: int, ys, xs, amp) -> np.ndarray:
    """Bilinear splat of points (unit coordinates, [n, K]) with weights ``amp``
    into [n, H, W]; points outside the image are dropped."""
    ys, xs = np.asarray(ys, np.float32), np.asarray(xs, np.float32)
    amp = np.broadcast_to(np.asarray(amp, np.float32), ys.shape)
    py, px = ys * (H - 1), xs * (W - 1)
    inside = (py >= 0) & (py <= H - 1) & (px >= 0) & (px <= W - 1)
    amp = np.where(inside, amp, 0)
    py, px = np.clip(py, 0, H - 1), np.clip(px, 0, W - 1)
    y0, x0 = np.floor(py).astype(np.int64), np.floor(px).astype(np.int64)
    fy, fx = py - y0, px - x0
    base = (np.arange(n, dtype=np.int64) * (H * W)).reshape(n, *([1] * (ys.ndim - 1)))
    idx, wts = [], []
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (1, 0, fy * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 1, fy * fx)):
        idx.append((base + ((y0 + dy) % H) * W + (x0 + dx) % W).ravel())
        wts.append((amp * w).ravel())
    out = np.bincount(np.concatenate(idx), weights=np.concatenate(wts), minlength=n * H * W)
    return out.reshape(n, H, W).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur of [n, h, w] (peak-1 kernel, like ``_gauss_hat``):
    separable taps with wrap-around for small sigma (cheaper than two FFTs), FFT otherwise."""
    r = int(math.ceil(3 * sigma))
    if r > 6:
        return _conv(img, _gauss_hat(sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32) / sigma) ** 2).astype(np.float32)
    h, w = img.shape[1:]
    p = np.pad(img, ((0, 0), (r, r), (0, 0)), mode="wrap")
    acc = taps[0] * p[:, :h]
    for k in range(1, 2 * r + 1):
        acc += taps[k] * p[:, k:k + h]
    p = np.pad(acc, ((0, 0), (0, 0), (r, r)), mode="wrap")
    acc = taps[0] * p[:, :, :w]
    for k in range(1, 2 * r + 1):
        acc += taps[k] * p[:, :, k:k + w]
    return acc


def _blobs(n, ys, xs, amp, sa, sb=None, theta=None) -> np.ndarray:
    """Sum of Gaussian blobs of peak ``amp`` at the points ([n, K]); std ``sa``
    (and ``sb`` across direction ``theta``) in pixels, scalars or per image.
    Images without a blob are skipped."""
    ys, xs = np.asarray(ys, np.float32).reshape(n, -1), np.asarray(xs, np.float32).reshape(n, -1)
    amp = np.broadcast_to(np.asarray(amp, np.float32).reshape(n, -1) if np.ndim(amp) else amp, ys.shape)
    out = np.zeros((n, H, W), np.float32)
    live = np.flatnonzero((amp != 0).any(axis=1))
    if not len(live):
        return out
    sa_n = np.broadcast_to(np.asarray(sa, np.float32), (n,))
    if sb is None and theta is None:
        for sig in np.unique(sa_n[live]):
            rows = live[sa_n[live] == sig]
            out[rows] = _blur(_splat(len(rows), ys[rows], xs[rows], amp[rows]), float(sig))
        return out
    sb_n = sa_n if sb is None else np.broadcast_to(np.asarray(sb, np.float32), (n,))
    th_n = np.zeros(n, np.float32) if theta is None else np.broadcast_to(np.asarray(theta, np.float32), (n,))
    out[live] = _conv(_splat(len(live), ys[live], xs[live], amp[live]), _gauss_hat(sa_n[live], sb_n[live], th_n[live]))
    return out


def _lines(n, curves, sigma) -> np.ndarray:
    """Curves through densely sampled points: ``curves`` is a list of
    ``(ys, xs, peak)`` with ys, xs [n, T] and peak a scalar, [n] or [n, T] (the
    cross-section height; 0 switches a curve off)."""
    all_y, all_x, all_a = [], [], []
    for ys, xs, peak in curves:
        seg = np.sqrt(np.diff(ys, axis=1) ** 2 + np.diff(xs, axis=1) ** 2) * (H - 1)
        spacing = np.concatenate([seg[:, :1], seg], axis=1)
        peak = np.asarray(peak, np.float32)
        peak = peak[:, None] if peak.ndim == 1 else peak
        all_y.append(ys), all_x.append(xs), all_a.append(peak * spacing / (math.sqrt(2 * math.pi) * sigma))
    return _blobs(n, np.concatenate(all_y, 1), np.concatenate(all_x, 1),
                  np.broadcast_to(np.concatenate([np.broadcast_to(a, y.shape) for a, y in zip(all_a, all_y)], 1),
                                  np.concatenate(all_y, 1).shape), sigma)


def _walk(y0, x0, phi0, kappa, length, T=48, wiggle=0.0, rng=None):
    """Points of a smooth curve ([n, T]) starting at (y0, x0) with heading phi0
    (radians, x right, y down) turning at rate kappa per unit length fraction."""
    t = np.linspace(0, 1, T, dtype=np.float32)[None]
    phi = np.asarray(phi0, np.float32)[:, None] + np.asarray(kappa, np.float32)[:, None] * t
    if wiggle and rng is not None:
        n = phi.shape[0]
        f, p = rng.uniform(1.5, 4, (n, 1)), rng.uniform(0, 2 * np.pi, (n, 1))
        phi = phi + np.asarray(wiggle, np.float32).reshape(-1, 1) * np.sin(2 * np.pi * f * t + p)
    step = np.asarray(length, np.float32)[:, None] / T
    ys = np.asarray(y0, np.float32)[:, None] + np.cumsum(np.sin(phi) * step, axis=1)
    xs = np.asarray(x0, np.float32)[:, None] + np.cumsum(np.cos(phi) * step, axis=1)
    return ys.astype(np.float32), xs.astype(np.float32)


def _lowfreq(rng, n, cells=8) -> np.ndarray:
    """Smooth unit-variance noise: a coarse grid of normals, bilinearly upsampled."""
    g = rng.standard_normal((n, cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, H, dtype=np.float32)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = (t - i0.astype(np.float32))[None]
    rows = g[:, i0] * (1 - f[..., None]) + g[:, i0 + 1] * f[..., None]            # [n, H, cells+1]
    out = rows[:, :, i0] * (1 - f[:, None, :]) + rows[:, :, i0 + 1] * f[:, None, :]
    return out / (out.std(axis=(1, 2), keepdims=True) + 1e-6)


def _fine(rng, n, sigma=0.8) -> np.ndarray:
    """Fine-grained unit-variance texture (white noise blurred by ``sigma`` pixels)."""
    w = _blur(rng.standard_normal((n, H, W), dtype=np.float32), sigma)
    return w / (w.std(axis=(1, 2), keepdims=True) + 1e-6)


def _streaks(rng, n, theta) -> np.ndarray:
    """Wavy parallel fibres along direction theta: a smooth random 1-D profile
    read across the fibres (cheaper than an anisotropic 2-D blur), unit variance."""
    L = 2 * H
    prof = _blur(rng.standard_normal((n, 1, L), dtype=np.float32), 0.8)[:, 0]
    prof /= prof.std(axis=1, keepdims=True) + 1e-6
    c, s = _col(np.cos(theta)), _col(np.sin(theta))
    along = c * _XX[None] + s * _YY[None]
    across = (-s * _XX[None] + c * _YY[None]) * (H - 1) + 1.5 * np.sin(2 * np.pi * (2 * along + _col(rng.random(n))))
    pos = np.clip(across + L / 2 - 0.5, 0, L - 1.001)
    i0 = pos.astype(np.int64)
    fr = pos - i0
    rows = np.arange(n)[:, None, None]
    fib = prof[rows, i0] * (1 - fr) + prof[rows, i0 + 1] * fr
    return fib * (0.7 + 0.3 * _lowfreq(rng, n, 4))


def _u(rng, lo, hi, n) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float32)


def _count(rng, f, table: dict, n) -> np.ndarray:
    """Per-image integer count from {finding: (lo, hi)} (inclusive); 0 for others."""
    out = np.zeros(n, np.int64)
    for key, (lo, hi) in table.items():
        m = f == key
        out[m] = rng.integers(lo, hi + 1, int(m.sum()))
    return out


def _active(count, K) -> np.ndarray:
    return (np.arange(K)[None] < np.asarray(count)[:, None]).astype(np.float32)


def _ellipse(cy, cx, ry, rx, theta=None):
    """Normalised squared distance ((dy/ry)^2 + (dx/rx)^2), rotated by theta; per image."""
    dy, dx = _YY[None] - _col(cy), _XX[None] - _col(cx)
    if theta is not None:
        c, s = _col(np.cos(theta)), _col(np.sin(theta))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dy / _col(ry)) ** 2 + (dx / _col(rx)) ** 2


def _grey(img) -> np.ndarray:
    return np.repeat(img[..., None], 3, axis=-1)


# ---- principle 1: radiograph-like (grey chest) -------------------------------------------

def render_xray(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    Y, X = _YY[None], _XX[None]
    cx, cy = 0.5 + u(-0.025, 0.025), u(-0.025, 0.025)
    # body: a superellipse reaching above the top edge (shoulders), soft tissue grey
    by, bry, brx = 0.68 + cy, u(0.60, 0.66), u(0.42, 0.48)
    body = _sig((1 - np.abs((Y - _col(by)) / _col(bry)) ** 2.6 - np.abs((X - _col(cx)) / _col(brx)) ** 2.6) * 9)
    img = 0.05 + 0.5 * body
    sep, lry, lrx = u(0.15, 0.18), u(0.26, 0.30), u(0.11, 0.135)
    lcy = 0.47 + cy + u(-0.015, 0.015)
    lungs = [_sig((1 - _ellipse(lcy, cx + s * sep, lry, lrx)) * 10) for s in (-1, 1)]
    hs = np.where(f == "cardiomegaly", u(1.30, 1.42), u(0.92, 1.08))
    heart = _sig((1 - _ellipse(0.64 + cy, cx + 0.035, 0.12 * hs, 0.115 * hs)) * 7)
    lung = (lungs[0] + lungs[1]) * (1 - heart)
    # lesion side per image (-1: image left, +1: image right) and the lung on that side
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    lside = np.where(_col(side) < 0, lungs[0], lungs[1]) * (1 - heart)
    lcx = cx + side * sep
    ax = _col(side) * (X - _col(cx))                     # lateral distance on the lesion side
    # pneumothorax: lateral part of one lung without markings, a thin pleural line
    ptx_on = _col(f == "pneumothorax")
    edge = sep + lrx * u(0.05, 0.45)
    ptx = ptx_on * _sig((ax - _col(edge)) * 140) * lside
    pleural = ptx_on * np.exp(-0.5 * ((ax - _col(edge)) / 0.009) ** 2) * lside
    marks = 0.045 * _fine(rng, n, 0.9) * (1 - ptx)
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (10.5 * (Y + 0.6 * (X - _col(cx)) ** 2) + _col(u(0, 1))))) ** 4
    img = img - 0.34 * lung + lung * (0.10 * ribs + marks) - 0.07 * ptx + 0.14 * pleural
    img = img + 0.07 * np.exp(-0.5 * ((X - _col(cx)) / 0.028) ** 2) * body             # spine
    carina = lcy - 0.22 * lry
    img = img - 0.08 * np.exp(-0.5 * ((X - _col(cx)) / 0.016) ** 2) * _sig((_col(carina) - Y) * 60)  # trachea
    # parenchymal findings (computed only for the images that have them)
    ny, nx = lcy + lry * u(-0.55, 0.5), lcx + lrx * u(-0.55, 0.55)
    ns = np.where(f == "mass", u(3.0, 3.8), u(1.2, 1.6)) / (H - 1)
    namp = np.where(f == "nodule", u(0.18, 0.26), 0) + np.where(f == "mass", u(0.20, 0.26), 0)
    r = np.flatnonzero(namp)
    img[r] += _col(namp[r]) * np.exp(-0.5 * ((Y - _col(ny[r])) ** 2 + (X - _col(nx[r])) ** 2) / _col(ns[r]) ** 2)
    ccy, ccx, csy, csx, cth = (lcy + lry * u(0.1, 0.5), lcx + lrx * u(-0.35, 0.35), u(4, 6) / (H - 1),
                               u(3, 4.5) / (H - 1), u(0, np.pi))
    camp, tex = u(0.15, 0.21), _lowfreq(rng, n, 12)
    r = np.flatnonzero(f == "consolidation")
    cons = np.exp(-0.5 * _ellipse(ccy[r], ccx[r], csy[r], csx[r], cth[r]))
    img[r] += _col(camp[r]) * cons * (0.75 + 0.25 * tex[r]) * lside[r]
    level = lcy + lry * (1 - 2 * u(0.18, 0.32))
    r = np.flatnonzero(f == "effusion")
    img[r] += 0.3 * _sig((Y - _col(level[r]) + 0.7 * np.maximum(ax[r] - _col(sep[r]), 0)) * 70) * lside[r]
    # support devices: endotracheal tube (class = tip position), nasogastric tube
    tip = np.where(f == "ett_low", carina + u(-0.01, 0.07), carina - u(0.02, 0.10))   # borderline near the carina
    xoff = u(-0.006, 0.006)
    r = np.flatnonzero((f == "ett_normal") | (f == "ett_low"))
    xline = _col(cx[r] + xoff[r]) - 0.035 * _col(f[r] == "ett_low") * _sig((Y - _col(carina[r])) * 40)
    img[r] += 0.3 * np.exp(-0.5 * ((X - xline) / 0.011) ** 2) * _sig((_col(tip[r]) - Y) * 150)
    ngt_on = (f == "ngt").astype(np.float32)
    d_y = lcy + lry + u(0.0, 0.04)
    y1, x1 = _walk(np.zeros(n), cx - 0.012, np.full(n, np.pi / 2), u(-0.05, 0.05), d_y, T=56)
    y2, x2 = _walk(y1[:, -1], x1[:, -1], np.full(n, np.pi / 2), u(-1.8, -1.2), u(0.14, 0.2), T=20)
    img = img + _lines(n, [(y1, x1, 0.2 * ngt_on), (y2, x2, 0.2 * ngt_on)], 0.75)
    # acquisition: gain, offset, gamma, noise
    img = (img - 0.3) * _col(u(0.9, 1.12)) + 0.3 + _col(u(-0.03, 0.03))
    img = np.clip(img, 0, 1) ** _col(u(0.85, 1.15))
    img = img + 0.018 * rng.standard_normal((n, H, W), dtype=np.float32) + 0.015 * _lowfreq(rng, n, 4)
    return _grey(img)


# ---- principle 2: stained tissue (H&E-like, Beer-Lambert) -------------------------------------

_H_OD = np.array([0.65, 0.70, 0.29], np.float32)   # haematoxylin optical density (Ruifrok & Johnston)
_E_OD = np.array([0.07, 0.99, 0.11], np.float32)   # eosin


def render_histo(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    # eosin: background with fibres along a per-image direction
    fib_dir = u(0, np.pi)
    fib = _streaks(rng, n, fib_dir)
    fibrous = np.isin(f, ["stroma", "fibroadenoma", "dcis", "idc"])
    E = 0.5 + 0.07 * _lowfreq(rng, n, 5) + _col(np.where(fibrous, 0.16, 0.06)) * fib
    E = E * _col(np.where(f == "necrosis", 0.6, 1.0))
    # glands (colon) / slit ducts (fibroadenoma): up to G per image on a jittered 3x3 grid
    G = 6
    n_g = _count(rng, f, {"normal_mucosa": (4, 6), "adenoma": (3, 4), "adenocarcinoma": (4, 6),
                          "fibroadenoma": (2, 3)}, n)
    cells = np.argsort(rng.random((n, 9)), axis=1)[:, :G]
    gy = (cells // 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06, (n, G))
    gx = (cells % 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06, (n, G))
    gth = rng.uniform(0, np.pi, (n, G))
    r0 = rng.uniform(0.8, 1.2, (n, G))
    # dysplasia grade q: normal mucosa [0, 0.55], adenoma [0.45, 1]; the ranges overlap like real borderline
    # cases. It elongates glands, crowds and enlarges their nuclei.
    mucosal = (f == "normal_mucosa") | (f == "adenoma")
    q = np.where(f == "adenoma", u(0.45, 1.0), np.where(f == "normal_mucosa", u(0.0, 0.55), 0.0))
    gry = np.select([mucosal[:, None], f[:, None] == "adenocarcinoma"],
                    [(0.075 - 0.025 * q[:, None]) * r0, 0.045 * r0], default=0.02 * r0)
    grx = np.select([mucosal[:, None], f[:, None] == "adenocarcinoma"],
                    [(0.085 + 0.035 * q[:, None]) * r0, 0.05 * r0], default=0.17 * r0)
    g_on = _active(n_g, G)
    jag = np.maximum(1 + _col(np.where(f == "adenocarcinoma", 0.35, 0.0)) * _lowfreq(rng, n, 16), 0.4)
    lumen = np.zeros((n, H, W), np.float32)
    band = np.zeros((n, H, W), np.float32)
    for g in range(int(n_g.max(initial=0))):
        rows = np.flatnonzero(n_g > g)
        d = _ellipse(gy[rows, g], gx[rows, g], gry[rows, g], grx[rows, g], gth[rows, g]) * jag[rows]
        lumen[rows] = np.maximum(lumen[rows], _sig((1 - d) * 12))
        band[rows] = np.maximum(band[rows], _sig((2.2 - d) * 6))
    # nuclei lining the glands (P per gland, on a ring 1.25x the lumen; adenoma: two crowded rows)
    P = 28
    per = np.where(mucosal, np.round(14 + 14 * q), np.where(f == "fibroadenoma", 16, 14))[:, None, None]
    p_on = np.arange(P)[None, None] < per
    ang = 2 * np.pi * (np.arange(P)[None, None] + rng.uniform(-0.2, 0.2, (n, G, P))) / per
    rho = 1.3 + 0.25 * q[:, None, None] * (np.arange(P)[None, None] % 2 == 1)
    ey, ex = rho * gry[..., None] * np.sin(ang), rho * grx[..., None] * np.cos(ang)
    c, s = np.cos(gth)[..., None], np.sin(gth)[..., None]
    ny = (gy[..., None] + s * ex + c * ey).reshape(n, -1)
    nx = (gx[..., None] + c * ex - s * ey).reshape(n, -1)
    namp = (g_on[..., None] * p_on * rng.uniform(0.9, 1.2, (n, G, P))).reshape(n, -1)
    namp = namp * np.where((f == "adenocarcinoma")[:, None], rng.uniform(0.6, 1.6, (n, G * P)), 1.0)
    s_ring = np.where(mucosal, 0.85 + 0.4 * q, np.where(f == "adenocarcinoma", 1.2, 0.85))
    nuc = _blobs(n, ny, nx, namp, s_ring, s_ring * (1 - 0.45 * q), u(0, np.pi))
    # scattered nuclei: carcinoma (pleomorphic), stroma / fibroadenoma (spindle), dcis (inside a duct),
    # idc (cords), necrosis (debris)
    K = 64
    n_s = _count(rng, f, {"adenocarcinoma": (12, 34), "stroma": (12, 22), "fibroadenoma": (8, 14),
                          "dcis": (24, 54), "idc": (30, 60), "necrosis": (40, 64)}, n)
    sy, sx = rng.uniform(0.02, 0.98, (n, K)), rng.uniform(0.02, 0.98, (n, K))
    duct_c = rng.uniform(0.3, 0.7, (n, 2))
    duct_r = u(0.12, 0.25)
    rr, aa = duct_r[:, None] * 0.9 * np.sqrt(rng.random((n, K))), rng.uniform(0, 2 * np.pi, (n, K))
    is_dcis = (f == "dcis")[:, None]
    sy = np.where(is_dcis, duct_c[:, :1] + rr * np.sin(aa), sy)
    sx = np.where(is_dcis, duct_c[:, 1:] + rr * np.cos(aa), sx)
    clus = rng.uniform(0.1, 0.9, (n, 8, 2))[np.arange(n)[:, None], rng.integers(0, 8, (n, K))]
    is_idc = (f == "idc")[:, None]
    spread = rng.uniform(0.025, 0.06, (n, 1))                      # tight nests look duct-like
    sy = np.where(is_idc, clus[..., 0] + spread * rng.standard_normal((n, K)), sy)
    sx = np.where(is_idc, clus[..., 1] + spread * rng.standard_normal((n, K)), sx)
    samp = _active(n_s, K) * np.where((f == "adenocarcinoma") | is_idc[:, 0] | is_dcis[:, 0],
                                      1, 0.9)[:, None] * rng.uniform(0.7, 1.5, (n, K))
    spindle = np.isin(f, ["stroma", "fibroadenoma"])
    sa = np.select([spindle, f == "necrosis", f == "adenocarcinoma"], [1.9, 0.55, 1.3], default=1.15)
    sb = np.select([spindle, f == "necrosis", f == "adenocarcinoma"], [0.55, 0.55, 1.15], default=1.05)
    nuc = nuc + _blobs(n, sy, sx, samp, sa, sb, fib_dir)
    # small round dark lymphocytes (dense for "lymphocytes", a few in the lamina propria / stroma)
    L = 140
    n_l = _count(rng, f, {"lymphocytes": (90, 140), "normal_mucosa": (14, 24), "adenoma": (8, 14),
                          "idc": (3, 8), "stroma": (0, 4)}, n)
    nuc = nuc + _blobs(n, rng.random((n, L)), rng.random((n, L)), _active(n_l, L) * 1.2, 0.8)
    # DCIS duct wall: a ring of flat myoepithelial nuclei around the filled duct
    dd = _ellipse(duct_c[:, 0], duct_c[:, 1], duct_r, duct_r)
    wall = _col((f == "dcis") * u(0.3, 1.0)) * np.exp(-0.5 * ((np.sqrt(dd) - 1.0) / 0.06) ** 2)
    Hd = 1.6 * _sig((nuc - 0.45) * 9) * (0.85 + 0.15 * _fine(rng, n, 0.6)) + 0.5 * wall
    E = E * (1 - 0.95 * lumen) + 0.2 * band * (1 - lumen) - 0.12 * _col(f == "dcis") * _sig((1 - dd) * 12)
    Hd = Hd * (1 - 0.9 * lumen)
    # adipose: white polygonal cells with thin eosinophilic membranes (Voronoi)
    fat = np.flatnonzero(f == "adipose")
    seeds = rng.random((n, 12, 2)).astype(np.float32)[fat]
    if len(fat):
        d = (_YY[None, None] - seeds[..., 0, None, None]) ** 2 + (_XX[None, None] - seeds[..., 1, None, None]) ** 2
        d = np.sqrt(np.partition(d, 1, axis=1)[:, :2])
        E[fat] = 0.04 + 0.6 * np.exp(-0.5 * ((d[:, 1] - d[:, 0]) / 0.01) ** 2)
        Hd[fat] = 0.0
    # colour: transmitted light through two stains, per-image stain strength
    k_h, k_e = _col(u(0.85, 1.15)), _col(u(0.85, 1.15))
    od = (Hd * k_h)[..., None] * _H_OD + (np.maximum(E, 0) * k_e)[..., None] * _E_OD
    rgb = np.exp(-od) * _col(u(0.92, 1.0))[..., None]
    return rgb + 0.012 * rng.standard_normal(rgb.shape, dtype=np.float32)


# ---- principle 3: fundus-like ----------------------------------------------------------------

def render_fundus(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    Y, X = _YY[None], _XX[None]
    r = np.sqrt((Y - 0.5) ** 2 + (X - 0.5) ** 2)
    field_ = _sig((0.47 - r) * 200)
    pig = _col(u(0.75, 1.05))
    shade = (0.72 + 0.38 * (1 - (r / 0.47) ** 2)) * (1 + 0.05 * _lowfreq(rng, n, 6))
    rgb = (shade * pig)[..., None] * np.array([0.86, 0.38, 0.15], np.float32)
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)   # disc on image left / right
    dy_, dx_ = 0.5 + u(-0.03, 0.03), 0.5 + side * u(0.2, 0.24)
    my, mx = 0.5 + u(-0.02, 0.02), dx_ - side * u(0.2, 0.24)         # macula, temporal to the disc
    rd = u(0.075, 0.09) * np.where(f == "papilledema", 1.3, 1.0)
    cdr = np.select([f == "glaucoma", f == "glaucoma_suspect", f == "papilledema"],
                    [u(0.62, 0.85), u(0.45, 0.66), u(0.0, 0.1)], default=u(0.2, 0.48))
    dd = np.sqrt(_ellipse(dy_, dx_, rd * 1.08, rd))
    disc = _sig((1 - dd) * _col(np.where(f == "papilledema", 6.0, 25.0)))
    cup = _sig((_col(cdr) - np.sqrt(_ellipse(dy_, dx_ + side * 0.1 * rd, rd * 1.08, rd))) * 30)
    macula = np.exp(-0.5 * ((Y - _col(my)) ** 2 + (X - _col(mx)) ** 2) / 0.055 ** 2)
    rgb = rgb * (1 - 0.3 * macula)[..., None]
    rgb = rgb * (1 - disc[..., None]) + disc[..., None] * np.array([1.0, 0.74, 0.42], np.float32)
    rgb = rgb * (1 - cup[..., None]) + cup[..., None] * np.array([1.0, 0.97, 0.9], np.float32)
    # vessels, drawn for a disc on the right (temporal = image left) and mirrored (phi -> pi - phi)
    # for a disc on the left: (heading, turn, length) of the temporal arcades, which curve around
    # the macula, and of the shorter nasal vessels; each vessel has one thinner branch
    arcs = ((-np.pi / 2 - 0.35, -1.7, 0.62), (np.pi / 2 + 0.35, 1.7, 0.62),
            (-np.pi / 2 + 0.6, 0.6, 0.32), (np.pi / 2 - 0.6, -0.6, 0.32))
    curves = []
    for h0, k0, l0 in arcs:
        h, k = h0 + rng.normal(0, 0.08, n), k0 * u(0.85, 1.15)
        h, k = np.where(side > 0, h, np.pi - h), np.where(side > 0, k, -k)
        y, x = _walk(dy_, dx_, h, k, l0 * u(0.9, 1.1), T=56, wiggle=0.08, rng=rng)
        curves.append((y, x, 0.55))
        b = rng.integers(18, 36, n)
        bh = h + k * (b / 56) + np.where(rng.random(n) < 0.5, -0.7, 0.7)
        y2, x2 = _walk(y[np.arange(n), b], x[np.arange(n), b], bh, rng.normal(0, 0.5, n), u(0.12, 0.22), T=24,
                       wiggle=0.1, rng=rng)
        curves.append((y2, x2, 0.4))
    # new vessels (pdr): fine tortuous loops at the disc
    nv_on = (f == "pdr").astype(np.float32)
    for _ in range(3):
        y, x = _walk(dy_ + rng.normal(0, 0.03, n), dx_ + rng.normal(0, 0.03, n), u(0, 2 * np.pi), u(-6, 6),
                     u(0.1, 0.16), T=24, wiggle=0.6, rng=rng)
        curves.append((y, x, 0.35 * nv_on))
    ves = np.clip(_lines(n, curves, 0.8), 0, 1.0) * (1 - 0.7 * cup)
    rgb = rgb * (1 - ves[..., None] * np.array([0.35, 0.65, 0.65], np.float32))
    # red lesions: microaneurysms (tiny) and haemorrhages (blots), around the posterior pole
    K = 16
    n_ma = _count(rng, f, {"mild_npdr": (4, 9), "moderate_npdr": (3, 8), "pdr": (2, 6)}, n)
    n_hm = _count(rng, f, {"moderate_npdr": (3, 6), "pdr": (6, 12)}, n)
    pr, pa = 0.05 + 0.24 * np.sqrt(rng.random((n, K))), rng.uniform(0, 2 * np.pi, (n, K))
    red = _blobs(n, my[:, None] + pr * np.sin(pa), mx[:, None] + pr * np.cos(pa), _active(n_ma, K) * 1.1, 0.7)
    pr, pa = 0.05 + 0.26 * np.sqrt(rng.random((n, K))), rng.uniform(0, 2 * np.pi, (n, K))
    red = red + _blobs(n, my[:, None] + pr * np.sin(pa), mx[:, None] + pr * np.cos(pa),
                       _active(n_hm, K) * rng.uniform(0.7, 1.0, (n, K)), np.where(f == "pdr", 1.7, 1.3))
    rgb = rgb * (1 - np.clip(red, 0, 1)[..., None] * np.array([0.5, 0.8, 0.8], np.float32))
    # yellow lesions: hard exudates (clustered), drusen (at the macula); pale cotton-wool spots
    n_ex = _count(rng, f, {"moderate_npdr": (4, 10), "pdr": (0, 6)}, n)
    n_dr = _count(rng, f, {"drusen": (8, 16)}, n)
    cr, ca = 0.08 + 0.16 * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    ey = (my + cr * np.sin(ca))[:, None] + rng.normal(0, 0.035, (n, K))
    ex = (mx + cr * np.cos(ca))[:, None] + rng.normal(0, 0.035, (n, K))
    ey = np.where((f == "drusen")[:, None], my[:, None] + rng.normal(0, 0.05, (n, K)), ey)
    ex = np.where((f == "drusen")[:, None], mx[:, None] + rng.normal(0, 0.05, (n, K)), ex)
    yel = _blobs(n, ey, ex, _active(n_ex + n_dr, K) * rng.uniform(0.6, 1.0, (n, K)),
                 np.where(f == "drusen", 0.9, 0.65))
    n_cw = _count(rng, f, {"pdr": (1, 3), "moderate_npdr": (0, 1)}, n)
    pr, pa = 0.08 + 0.2 * np.sqrt(rng.random((n, 4))), rng.uniform(0, 2 * np.pi, (n, 4))
    cws = _blobs(n, my[:, None] + pr * np.sin(pa), mx[:, None] + pr * np.cos(pa), _active(n_cw, 4) * 0.7, 2.0)
    rgb = rgb + np.clip(yel, 0, 1)[..., None] * np.array([0.3, 0.42, 0.08], np.float32)
    rgb = rgb + np.clip(cws, 0, 1)[..., None] * np.array([0.2, 0.32, 0.28], np.float32)
    rgb = rgb * field_[..., None] + 0.015 * rng.standard_normal((n, H, W, 1), dtype=np.float32)
    return rgb


# ---- distractor domains (corpus only) -----------------------------------------------------------

def render_dermoscopy(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    Y, X = _YY[None], _XX[None]
    skin = np.array([0.90, 0.70, 0.60], np.float32) * _col(u(0.8, 1.05))[..., None]
    rgb = skin * (1 + 0.04 * _lowfreq(rng, n, 6))[..., None]
    cy, cx = 0.5 + u(-0.08, 0.08), 0.5 + u(-0.08, 0.08)
    th = np.arctan2(Y - _col(cy), X - _col(cx))
    irregular = np.where(f == "melanoma", 0.14, np.where(f == "bcc", 0.08, 0.035))
    rad = _col(u(0.18, 0.3)) * (1 + sum(_col(irregular * rng.uniform(0.3, 1, n)) * np.cos(k * th + _col(u(0, 6.3)))
                                        for k in (2, 3, 5, 7)))
    dist = np.sqrt((Y - _col(cy)) ** 2 + (X - _col(cx)) ** 2)
    les = _sig((rad - dist) * 70)
    base = np.select([f == "nevus", f == "melanoma", f == "seb_keratosis", f == "bcc"],
                     [0.0, 1.0, 2.0, 3.0], default=0.0).astype(np.int64)
    cols = np.array([[0.52, 0.33, 0.22], [0.30, 0.18, 0.14], [0.68, 0.50, 0.34], [0.82, 0.55, 0.55]], np.float32)
    lc = cols[base][:, None, None, :] * (1 + 0.12 * _lowfreq(rng, n, 10))[..., None]
    net = (0.5 + 0.5 * np.cos(2 * np.pi * 14 * X) * np.cos(2 * np.pi * 14 * Y)) * _col(f == "nevus")
    veil = _sig(_lowfreq(rng, n, 5) * 3 - 1) * _col(f == "melanoma")
    lc = lc * (1 - 0.15 * net)[..., None]
    lc = lc * (1 - veil[..., None]) + veil[..., None] * np.array([0.42, 0.48, 0.6], np.float32)
    rgb = rgb * (1 - les[..., None]) + lc * les[..., None]
    K = 10
    cyst = _blobs(n, _col(cy)[:, 0] + rng.normal(0, 0.1, (n, K)), _col(cx)[:, 0] + rng.normal(0, 0.1, (n, K)),
                  _active(np.where(f == "seb_keratosis", K, 0), K) * 0.8, 0.7) * les
    rgb = rgb + cyst[..., None] * 0.3
    vy, vx = _walk(cy + rng.normal(0, 0.05, n), cx + rng.normal(0, 0.05, n), u(0, 6.3), u(-3, 3), u(0.2, 0.35),
                   T=40, wiggle=0.5, rng=rng)
    vessel = _lines(n, [(vy, vx, 0.8 * (f == "bcc"))], 0.5)
    rgb = rgb * (1 - vessel[..., None] * np.array([0.1, 0.6, 0.6], np.float32))
    hy, hx = _walk(u(0, 1), np.zeros(n), u(-0.6, 0.6), u(-1, 1), np.full(n, 1.2), T=70)
    hair = _lines(n, [(hy, hx, 0.8 * (rng.random(n) < 0.5))], 0.45)
    rgb = rgb * (1 - 0.7 * np.clip(hair, 0, 1)[..., None])
    return rgb + 0.012 * rng.standard_normal(rgb.shape, dtype=np.float32)


def render_endoscopy(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    Y, X = _YY[None], _XX[None]
    ly, lx = u(0.3, 0.7), u(0.3, 0.7)
    d = np.sqrt((Y - _col(ly)) ** 2 + (X - _col(lx)) ** 2)
    bright = ((1 - 0.85 * np.exp(-0.5 * (d / _col(u(0.08, 0.14))) ** 2))
              * (1 + 0.1 * np.cos(2 * np.pi * (d * 9 + _col(u(0, 1))))))          # dark lumen, mucosal folds
    rgb = (bright * (1 + 0.06 * _lowfreq(rng, n, 6)))[..., None] * np.array([0.86, 0.43, 0.38], np.float32)
    py, px = u(0.2, 0.8), u(0.2, 0.8)
    pol = np.exp(-0.5 * ((Y - _col(py)) ** 2 + (X - _col(px)) ** 2) / _col(u(0.06, 0.1)) ** 2)
    rgb = (rgb * (1 + 0.5 * _col(f == "polyp") * pol)[..., None]
           - 0.15 * (_col(f == "polyp") * pol * (_YY[None] - _col(py)) * 8)[..., None])   # a shaded bulge
    ulc = _sig((0.7 - (((Y - _col(py)) ** 2 + (X - _col(px)) ** 2) / 0.06 ** 2)) * 4) * _col(f == "ulcer")
    rgb = rgb * (1 - ulc[..., None]) + ulc[..., None] * np.array([0.93, 0.88, 0.7], np.float32)
    blood = _sig(_lowfreq(rng, n, 4) * 3 - 1.5) * _col(f == "bleeding")
    rgb = rgb * (1 - blood[..., None]) + blood[..., None] * np.array([0.45, 0.05, 0.05], np.float32)
    K = 8
    spec = _blobs(n, rng.random((n, K)), rng.random((n, K)), rng.uniform(0.5, 1, (n, K)), 0.6)
    rgb = rgb + np.clip(spec, 0, 1)[..., None] * 0.7
    vign = _sig((0.62 - np.sqrt((Y - 0.5) ** 2 + (X - 0.5) ** 2)) * 60)
    return rgb * vign[..., None] + 0.01 * rng.standard_normal((n, H, W, 1), dtype=np.float32)


def render_cytology(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    K = 40
    ry, rx = rng.random((n, K)), rng.random((n, K))
    keep = ((ry - 0.5) ** 2 + (rx - 0.5) ** 2 > 0.02) * _active(rng.integers(18, 34, n), K)
    rbc = _blobs(n, ry, rx, keep, 2.6) - 0.55 * _blobs(n, ry, rx, keep, 1.2)
    rgb = np.array([0.95, 0.9, 0.92], np.float32) * np.ones((n, H, W, 1), np.float32)
    rgb = rgb * (1 - np.clip(rbc, 0, 1)[..., None] * np.array([0.1, 0.4, 0.3], np.float32))
    cy, cx = 0.5 + u(-0.05, 0.05), 0.5 + u(-0.05, 0.05)
    cyto = np.exp(-0.5 * ((_YY[None] - _col(cy)) ** 2 + (_XX[None] - _col(cx)) ** 2)
                  / _col(np.where(f == "blast", 5.5, 4.5) / (H - 1)) ** 2)
    cyto_col = np.where((f == "eosinophil")[:, None], [0.95, 0.6, 0.45],
                        np.where((f == "lymphocyte")[:, None] | (f == "blast")[:, None], [0.6, 0.7, 0.9],
                                 [0.88, 0.75, 0.85])).astype(np.float32)
    c = _sig((cyto - 0.35) * 12)[..., None]
    rgb = rgb * (1 - c) + c * cyto_col[:, None, None, :]
    lobes = np.where(f == "neutrophil", 4, np.where(f == "eosinophil", 2, 1))
    ang = rng.uniform(0, 2 * np.pi, (n, 1)) + 2 * np.pi * np.arange(4)[None] / lobes[:, None]
    off = np.where(lobes > 1, 2.8, 0.0)[:, None] / (H - 1)
    ns = np.select([f == "lymphocyte", f == "blast"], [2.8, 3.6], default=1.25)
    nuc = _blobs(n, cy[:, None] + off * np.sin(ang), cx[:, None] + off * np.cos(ang), _active(lobes, 4), ns)
    nucm = _sig((nuc - 0.45) * 10) * _col(np.where(f == "blast", 0.75, 1.0))
    rgb = rgb * (1 - nucm[..., None] * np.array([0.55, 0.7, 0.3], np.float32))
    G = 30
    gr = rng.normal(0, 3.0 / (H - 1), (n, G, 2))
    gran = _blobs(n, cy[:, None] + gr[..., 0], cx[:, None] + gr[..., 1],
                  _active(np.where(f == "eosinophil", G, 0), G), 0.6)
    rgb = rgb * (1 - np.clip(gran, 0, 1)[..., None] * np.array([0.05, 0.5, 0.6], np.float32))
    return rgb + 0.01 * rng.standard_normal(rgb.shape, dtype=np.float32)


def render_ct(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    Y, X = _YY[None], _XX[None]
    cy, cx, ry, rx = 0.5 + u(-0.03, 0.03), 0.5 + u(-0.03, 0.03), u(0.38, 0.43), u(0.31, 0.36)
    d = np.sqrt(_ellipse(cy, cx, ry, rx))
    skull = _sig((1.0 - d) * 60) - _sig((0.92 - d) * 60)
    brain = _sig((0.92 - d) * 60)
    img = 0.03 + 0.92 * skull + brain * (0.45 + 0.02 * _lowfreq(rng, n, 8))
    vs = np.where(f == "hydrocephalus", 1.8, 1.0)
    for s in (-1, 1):
        v = np.exp(-0.5 * _ellipse(cy, cx + s * 0.045 * vs, 0.09 * vs, 0.025 * vs, np.full(n, s * 0.3)))
        img = img - 0.25 * brain * v
    ly, lx = cy + u(-0.2, 0.2) * ry, cx + u(-0.25, 0.25) * rx
    les = np.exp(-0.5 * ((Y - _col(ly)) ** 2 + (X - _col(lx)) ** 2) / _col(u(2.5, 4) / (H - 1)) ** 2)
    wedge = np.exp(-0.5 * ((Y - _col(ly)) ** 2 + (X - _col(lx)) ** 2) / _col(u(5, 7) / (H - 1)) ** 2)
    img = img + brain * (0.3 * _col(f == "haemorrhage") * les - 0.12 * _col(f == "infarct") * wedge)
    img = img + 0.02 * rng.standard_normal((n, H, W), dtype=np.float32)
    return _grey(img)


def render_ultrasound(rng, f) -> np.ndarray:
    n = len(f)
    u = lambda lo, hi: _u(rng, lo, hi, n)  # noqa: E731
    Y, X = _YY[None], _XX[None]
    ay = -0.05
    rr = np.sqrt((Y - ay) ** 2 + (X - 0.5) ** 2)
    th = np.arctan2(X - 0.5, Y - ay)
    sector = _sig((0.62 - np.abs(th)) * 40) * _sig((rr - 0.12) * 60) * _sig((1.0 - rr) * 60)
    sp = np.minimum((_fine(rng, n, 0.7) ** 2 + _fine(rng, n, 0.7) ** 2) / 2, 3)      # speckle, mean 1
    tissue = (0.5 - 0.2 * rr) * (0.55 + 0.45 * sp) * (1 + 0.15 * _lowfreq(rng, n, 5))
    ly, lx, lr = u(0.4, 0.65), 0.5 + u(-0.15, 0.15), u(0.06, 0.1)
    d = np.sqrt((Y - _col(ly)) ** 2 + (X - _col(lx)) ** 2) / _col(lr)
    cyst = _col(f == "cyst") * _sig((1 - d) * 10)
    below = _sig((Y - _col(ly)) * 40) * np.exp(-0.5 * ((X - _col(lx)) / (_col(lr) * 0.8)) ** 2)
    stone = _col(f == "gallstone") * np.exp(-0.5 * ((d - 0.5) / 0.2) ** 2) * _sig((_col(ly) - Y) * 80 + 2)
    mass = _col(f == "mass") * _sig((1 - d) * 8)
    img = tissue * (1 - cyst) * (1 - 0.85 * _col(f == "gallstone") * below) * (1 + 0.6 * mass)
    img = img + 0.15 * _col(f == "cyst") * below * sp + 0.8 * stone   # posterior enhancement, stone echo
    return _grey(img * sector)


def _acquire(rgb, rng, style: dict) -> np.ndarray:
    """A task's acquisition shift (what separates a curated dataset from corpus
    figures): blur (pixels), gain, per-channel tint, extra noise."""
    n = rgb.shape[0]
    if style.get("blur"):
        x = rgb.transpose(0, 3, 1, 2).reshape(n * 3, H, W)
        unit = _gauss_hat(style["blur"]) / (2 * np.pi * style["blur"] ** 2)     # kernel summing to 1
        rgb = _conv(x, unit).reshape(n, 3, H, W).transpose(0, 2, 3, 1)
    rgb = rgb * style.get("gain", 1.0) * np.asarray(style.get("tint", (1.0, 1.0, 1.0)), np.float32)
    if style.get("noise"):
        rgb = rgb + style["noise"] * rng.standard_normal(rgb.shape, dtype=np.float32)
    return rgb
