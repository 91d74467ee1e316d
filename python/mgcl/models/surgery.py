"""Model surgery for parameter-efficient continual learning: what MoE-Adapters
and DIKI insert into the transformer blocks of both towers of a frozen CLIP.

``Adapted(model, experts=..., prefix=...)`` replaces every transformer block of
the image and the text tower of ``model`` (in place) by an :class:`AdaptedBlock`
that runs the original block's own modules and adds, per block:

- ``experts`` (:class:`Experts`, MoE-Adapters): a mixture of bottleneck
  adapters beside the MLP, read from the residual stream after attention,
  with a noisy top-k router per task (Shazeer et al. 2017)::

      x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) + sum_e g_e(x_0) * A_e(x)

  where ``x_0`` is the block's first token (CLS / start-of-text) and ``g`` the
  router of the task being routed (route -1: no experts at all);
- ``prefix`` (:class:`PrefixKV`, DIKI): residual prefix-KV prompts. The
  block's queries attend, in a second attention that the original softmax
  never sees, to a task's learned keys and values (already in head space,
  no in-projection), and the result, times a per-sample weight w, joins the
  attention output before the output projection::

      attn(h) = W_o (softmax(q k^T / sqrt(d_h)) v + w * softmax(q P_k^T / sqrt(d_h)) P_v) + b_o

  so with w = 0 (or route -1) the block is exactly the pre-trained one.

Which expert / prompt runs is set per call, not stored in the weights:
``with adapted.routing(ids, weights): adapted.encode_image(x)`` (``ids`` an
int or a ``[B]`` tensor of task ids, -1 = the untouched backbone; ``weights``
None (1), a float or a ``[B]`` tensor). Outside a ``routing`` block every
call is routed to -1, the pre-trained model.

Supported blocks: ``torch.nn.TransformerEncoderLayer`` with ``norm_first``
(TinyCLIP's ViT and text towers) and open_clip's ``ResidualAttentionBlock``
(open_clip CLIP models: ViT-B-16 and friends). Other towers (timm, Hugging
Face BERT) raise a ValueError naming what was found.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# ---- finding the blocks ----------------------------------------------------------------------


def tower_blocks(model) -> dict:
    """``{"image": ModuleList, "text": ModuleList}``: the transformer blocks of
    each tower of a TinyCLIP (ViT option) or an open_clip CLIP (ValueError otherwise)."""
    from .openclip import OpenCLIP  # noqa: PLC0415
    from .tiny import TinyCLIP  # noqa: PLC0415

    if isinstance(model, TinyCLIP):
        if model.config.vision != "vit":
            raise ValueError("model surgery: TinyCLIP's image tower is a CNN (no transformer blocks); "
                             "build it with vision='vit'")
        return {"image": model.visual.blocks.layers, "text": model.text.blocks.layers}
    if isinstance(model, OpenCLIP):
        m = model.model
        vis = getattr(getattr(m, "visual", None), "transformer", None)
        txt = getattr(m, "transformer", None)
        if vis is None or txt is None or not hasattr(vis, "resblocks") or not hasattr(txt, "resblocks"):
            raise ValueError(f"model surgery: open_clip model {model.name!r} has no native transformer towers "
                             f"(visual {type(getattr(m, 'visual', None)).__name__}, text "
                             f"{type(getattr(m, 'text', None)).__name__}); supported: open_clip CLIP ViTs "
                             "such as ViT-B-16")
        return {"image": vis.resblocks, "text": txt.resblocks}
    raise ValueError(f"model surgery: unsupported model {type(model).__name__}; supported: TinyCLIP(vision='vit'), "
                     "OpenCLIP of an open_clip CLIP ViT (e.g. ViT-B-16)")


def _kind(block: nn.Module) -> str:
    if isinstance(block, nn.TransformerEncoderLayer):
        if not block.norm_first or not block.self_attn.batch_first:
            raise ValueError("model surgery: TransformerEncoderLayer blocks must be norm_first and batch_first")
        return "torch"
    if type(block).__name__ == "ResidualAttentionBlock" and isinstance(getattr(block, "attn", None),
                                                                       nn.MultiheadAttention):
        if not block.attn.batch_first:
            raise ValueError("model surgery: open_clip blocks must be batch_first")
        return "open_clip"
    raise ValueError(f"model surgery: unsupported transformer block {type(block).__name__}")


def _attention(block: nn.Module) -> nn.MultiheadAttention:
    return block.self_attn if isinstance(block, nn.TransformerEncoderLayer) else block.attn


# ---- the route of a call -----------------------------------------------------------------------


class Route:
    """Which task's experts / prompts a forward pass uses (module doc)."""

    def __init__(self):
        self.ids = -1
        self.weights = None

    def per_sample(self, batch: int, device) -> torch.Tensor:
        ids = self.ids
        if isinstance(ids, int):
            return torch.full((batch,), ids, dtype=torch.long, device=device)
        return ids.to(device=device, dtype=torch.long).expand(batch) if ids.numel() == 1 else \
            ids.to(device=device, dtype=torch.long)

    def weight(self, batch: int, device, dtype) -> Optional[torch.Tensor]:
        w = self.weights
        if w is None:
            return None
        if not isinstance(w, torch.Tensor):
            w = torch.tensor(float(w))
        return w.to(device=device, dtype=dtype).reshape(-1).expand(batch)


# ---- MoE-Adapters' experts -----------------------------------------------------------------------


class Adapter(nn.Module):
    """A bottleneck adapter: ``scale * up(dropout(relu(down(x))))``, LoRA-style init
    (down: PyTorch's default Linear init with zero bias; up: zeros), so it adds
    nothing before training."""

    def __init__(self, width: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale, self.dropout = float(scale), float(dropout)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = F.dropout(F.relu(self.down(x)), self.dropout, self.training)
        return self.up(h) * self.scale


class Experts(nn.Module):
    """``n_experts`` adapters and one noisy top-``top_k`` router per task
    (``routers[t]``, ``noise[t]``: ``[width, n_experts]``, zeros at first).

    Gating of a sample from its first token ``x_0`` (router of its task t):
    clean logits ``x_0 W_t``; in training mode noise ``N(0, 1) * (softplus(x_0
    N_t) + 1e-2)`` is added; the top-k logits are soft-maxed into the gates,
    the others are 0. ``counts[e]`` counts the samples routed to expert e in
    training mode (what MoE-Adapters freezes experts by)."""

    NOISE_EPSILON = 1e-2

    def __init__(self, width: int, n_tasks: int, n_experts: int = 22, top_k: int = 2, bottleneck: int = 64,
                 scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"Experts: top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.top_k, self.n_experts = int(top_k), int(n_experts)
        self.adapters = nn.ModuleList(Adapter(width, bottleneck, scale, dropout) for _ in range(n_experts))
        self.routers = nn.ParameterList(nn.Parameter(torch.zeros(width, n_experts)) for _ in range(n_tasks))
        self.noise = nn.ParameterList(nn.Parameter(torch.zeros(width, n_experts)) for _ in range(n_tasks))
        self.register_buffer("counts", torch.zeros(n_experts, dtype=torch.long), persistent=False)

    def gates(self, x0: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[B, n_experts]`` gates of samples with first tokens ``x0`` routed by task ``ids`` (>= 0)."""
        W = torch.stack(list(self.routers))[ids].to(x0.dtype)          # [B, width, E]
        clean = torch.einsum("bd,bde->be", x0, W)
        logits = clean
        if self.training:
            Wn = torch.stack(list(self.noise))[ids].to(x0.dtype)
            std = F.softplus(torch.einsum("bd,bde->be", x0, Wn)) + self.NOISE_EPSILON
            logits = clean + torch.randn_like(clean) * std
        top, idx = logits.topk(self.top_k, dim=1)
        return torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, dim=1))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The experts' sum for ``x`` ``[B, N, width]``; 0 for samples routed to -1."""
        out = torch.zeros_like(x)
        on = (ids >= 0).nonzero().flatten()
        if on.numel() == 0:
            return out
        xs = x[on]
        g = self.gates(xs[:, 0], ids[on])
        if self.training:
            self.counts += (g > 0).sum(0)
        y = torch.zeros_like(xs)
        for e in (g > 0).any(0).nonzero().flatten().tolist():
            rows = (g[:, e] > 0).nonzero().flatten()
            y = y.index_add(0, rows, (g[rows, e, None, None] * self.adapters[e](xs[rows])).to(y.dtype))
        return out.index_copy(0, on, y.to(out.dtype))


# ---- DIKI's prefix-KV prompts ------------------------------------------------------------------


class PrefixKV(nn.Module):
    """One prompt per task: ``prompts[t]`` ``[2, length, width]`` (keys uniform in
    [-1, 1], values zeros, so a new prompt adds nothing until trained)."""

    def __init__(self, width: int, n_tasks: int, length: int = 8):
        super().__init__()
        self.prompts = nn.ParameterList()
        for _ in range(n_tasks):
            p = torch.zeros(2, length, width)
            nn.init.uniform_(p[0], -1.0, 1.0)
            self.prompts.append(nn.Parameter(p))

    def forward(self, h: torch.Tensor, attn: nn.MultiheadAttention, ids: torch.Tensor,
                weights: Optional[torch.Tensor]) -> torch.Tensor:
        """The residual term of the attention of input ``h`` ``[B, N, width]`` (before
        the output projection's bias; 0 for samples routed to -1)."""
        out = torch.zeros_like(h)
        on = (ids >= 0).nonzero().flatten()
        if on.numel() == 0:
            return out
        B, N, D = h[on].shape
        H = attn.num_heads
        hd = D // H
        q = F.linear(h[on], attn.in_proj_weight[:D], attn.in_proj_bias[:D] if attn.in_proj_bias is not None
                     else None).view(B, N, H, hd).transpose(1, 2)
        P = torch.stack(list(self.prompts))[ids[on]].to(h.dtype)          # [B, 2, L, D]
        k = P[:, 0].view(B, -1, H, hd).transpose(1, 2)
        v = P[:, 1].view(B, -1, H, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)                      # [B, H, N, hd]
        if weights is not None:
            o = o * weights[on].view(B, 1, 1, 1)
        o = F.linear(o.transpose(1, 2).reshape(B, N, D), attn.out_proj.weight)
        return out.index_copy(0, on, o.to(out.dtype))


# ---- the adapted block and model -----------------------------------------------------------------


class AdaptedBlock(nn.Module):
    """A transformer block run from its own modules, plus experts and / or a
    prefix (module doc). Same call signature as the block it replaces."""

    def __init__(self, block: nn.Module, route: Route, experts: Optional[Experts] = None,
                 prefix: Optional[PrefixKV] = None):
        super().__init__()
        self.kind = _kind(block)
        self.block, self.experts, self.prefix = block, experts, prefix
        self._route = route

    @property
    def self_attn(self):  # nn.TransformerEncoder reads layers[0].self_attn.batch_first
        return _attention(self.block)

    def get_weight_dtype(self):  # open_clip's Transformer.get_cast_dtype reads resblocks[0]
        return self.block.get_weight_dtype()

    def _attend(self, h, **kw):
        attn = _attention(self.block)
        a = attn(h, h, h, need_weights=False, **kw)[0]
        if self.prefix is not None:
            ids = self._route.per_sample(h.shape[0], h.device)
            a = a + self.prefix(h, attn, ids, self._route.weight(h.shape[0], h.device, h.dtype))
        return a

    def forward(self, x, *args, **kw):
        b = self.block
        if self.kind == "torch":
            x = x + b.dropout1(self._attend(b.norm1(x), attn_mask=kw.get("src_mask"),
                                            key_padding_mask=kw.get("src_key_padding_mask"),
                                            is_causal=kw.get("is_causal", False)))
            ffn = b.dropout2(b.linear2(b.dropout(b.activation(b.linear1(b.norm2(x))))))
        else:
            mask = kw.get("attn_mask", args[2] if len(args) > 2 else None)
            x = x + b.ls_1(self._attend(b.ln_1(x), attn_mask=mask.to(x.dtype) if mask is not None else None))
            ffn = b.ls_2(b.mlp(b.ln_2(x)))
        if self.experts is not None:
            ffn = ffn + self.experts(x, self._route.per_sample(x.shape[0], x.device))
        return x + ffn


class Adapted(nn.Module):
    """A VLM whose blocks were replaced by :class:`AdaptedBlock` (module doc); the
    VLM protocol is the base model's, calls routed by :meth:`routing`.

    ``experts`` / ``prefix``: ``{"image": [module or None per block], "text": [...]}``."""

    def __init__(self, base: nn.Module, experts: Optional[dict] = None, prefix: Optional[dict] = None):
        super().__init__()
        self.base = base
        self.route = Route()
        towers = tower_blocks(base)
        for tower, blocks in towers.items():
            for i in range(len(blocks)):
                e = (experts or {}).get(tower, [None] * len(blocks))[i]
                p = (prefix or {}).get(tower, [None] * len(blocks))[i]
                blocks[i] = AdaptedBlock(blocks[i], self.route, e, p)
        self.towers = {k: list(v) for k, v in towers.items()}  # plain lists: not registered twice

    @contextlib.contextmanager
    def routing(self, ids=-1, weights=None):
        """Route the calls inside the block (module doc); restores the previous route."""
        saved = self.route.ids, self.route.weights
        self.route.ids, self.route.weights = ids, weights
        try:
            yield self
        finally:
            self.route.ids, self.route.weights = saved

    def blocks(self, tower: str) -> list:
        return self.towers[tower]

    @property
    def logit_scale(self):
        return self.base.logit_scale

    def encode_image(self, images):
        return self.base.encode_image(images)

    def encode_text(self, tokens):
        return self.base.encode_text(tokens)

    def tokenize(self, texts):
        return self.base.tokenize(texts)

    def transform(self, train: bool):
        return self.base.transform(train)


def widths(model) -> dict:
    """The residual width of each tower's blocks."""
    return {tower: _attention(blocks[0]).embed_dim for tower, blocks in tower_blocks(model).items()}


def depth_count(model) -> dict:
    """How many blocks each tower has."""
    return {tower: len(blocks) for tower, blocks in tower_blocks(model).items()}


__all__ = ["Adapted", "AdaptedBlock", "Adapter", "Experts", "PrefixKV", "Route", "tower_blocks", "widths",
           "depth_count"]
