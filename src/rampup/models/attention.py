"""Attention patterns as schedule knobs, with a block-banded kernel for windows.

Knob ``attention``: ``causal``; ``window`` (the last ``window`` tokens, the query's own included);
``sinks`` (the first ``n_global`` tokens plus the window, LM-Infinite / StreamingLLM; ``capped_distance``
shows the global tokens at RoPE distance ``window``); hybrids, where ``full_layers`` or ``full_every: k``
(layers k-1, 2k-1, ...) keep full causal attention (LongGen). Knob ``window`` is the width and may ramp;
document masking (``data.doc_mask``) combines with any pattern.

:func:`banded_attention` computes a window in blocks of ``window`` queries against the ``2 * window - 1``
keys each can see (plus the global ones), so memory grows as T * window, not T^2; :func:`pattern_mask` is
the dense reference it is tested against. See docs/context.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from rampup.configbase import Section


class AttentionSpec(Section):
    """The attention pattern of a stage (knob ``attention``); its width is the knob ``window``."""

    kind: Literal["causal", "window", "sinks"] = "causal"
    """causal (full), window (sliding window of `window` tokens) or sinks (n_global first tokens + window)."""
    n_global: int = Field(default=4, ge=1)
    """For sinks: how many leading tokens every query also sees."""
    capped_distance: bool = False
    """For sinks: global tokens outside a query's window are seen at relative (RoPE) distance
    `window` instead of their true distance (LM-Infinite). False: their true distance (StreamingLLM
    style masks)."""
    full_layers: list[int] | None = None
    """Hybrid: indices of layers that keep full causal attention (the others use the pattern)."""
    full_every: int | None = Field(default=None, ge=1)
    """Hybrid: every k-th layer (k-1, 2k-1, ...) keeps full causal attention."""

    @model_validator(mode="after")
    def _check(self) -> AttentionSpec:
        if self.full_layers is not None and self.full_every is not None:
            raise ValueError("attention: give full_layers or full_every, not both")
        if self.capped_distance and self.kind != "sinks":
            raise ValueError("attention: capped_distance applies to the global tokens of kind: sinks")
        if self.kind == "causal" and (self.full_layers is not None or self.full_every is not None):
            raise ValueError(
                "attention: full_layers/full_every make a hybrid of a window pattern; set kind: window or sinks"
            )
        return self

    def full(self, n_layers: int) -> set[int]:
        """The layers that keep full causal attention."""
        if self.kind == "causal":
            return set(range(n_layers))
        if self.full_layers is not None:
            return set(self.full_layers)
        if self.full_every is not None:
            return {i for i in range(n_layers) if (i + 1) % self.full_every == 0}
        return set()

    def __str__(self) -> str:
        if self.kind == "causal":
            return "causal"
        s = self.kind + (
            f"({self.n_global}{', capped' if self.capped_distance else ''})" if self.kind == "sinks" else ""
        )
        if self.full_layers is not None:
            s += f", full layers {self.full_layers}"
        if self.full_every is not None:
            s += f", full every {self.full_every} layers"
        return s


@dataclass(frozen=True)
class Pattern:
    """What one layer computes: a window of ``window`` tokens plus ``n_global`` leading ones, seen
    at their true distance or (``capped``) at distance ``window``."""

    window: int
    n_global: int = 0
    capped: bool = False


def layer_patterns(spec: AttentionSpec, window: int, n_layers: int) -> list[Pattern | None]:
    """Per layer: None for full causal attention, else its Pattern."""
    if spec.kind == "causal":
        return [None] * n_layers
    full = spec.full(n_layers)
    bad = sorted(i for i in full if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"attention.full_layers names layers {bad}, but the model has {n_layers} (0..{n_layers - 1})")
    if window < 1:
        raise ValueError(f"attention '{spec.kind}' needs the knob window >= 1, got {window}")
    sinks = spec.kind == "sinks"
    p = Pattern(window, spec.n_global if sinks else 0, sinks and spec.capped_distance)
    return [None if i in full else p for i in range(n_layers)]


def pattern_mask(T: int, pattern: Pattern, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) bool, True = query i may attend key j: causal, within the window or global."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & ((i - j < pattern.window) | (j < pattern.n_global))


def _capped_scores(
    q_cap: torch.Tensor | None, k_cap: torch.Tensor | None, n_global: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q_cap, k_cap) when the ``n_global`` leading keys are scored at the capped distance, else None."""
    if not n_global or q_cap is None:
        return None
    if k_cap is None:
        raise ValueError("q_cap needs k_cap (the global keys rotated for the capped distance)")
    return q_cap, k_cap


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    q_cap: torch.Tensor | None = None,
    k_cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q (B, H, T, hd) over k, v (B, KV, T, hd) restricted to ``pattern``: (B, H, T, hd).

    Queries are cut into nb blocks of c = window; block b sees keys [b*c - w + 1, b*c + c), i.e.
    c + w - 1 of them, plus the n_global leading keys where the window no longer covers them.
    With ``q_cap`` (B, H, T, hd) and ``k_cap`` (B, KV, n_global, hd) those global keys are scored
    as q_cap . k_cap instead of q . k (the distance-capped scores: see ``Attention.forward``'s cap_rope).
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    if KV != H:  # grouped-query attention: each kv head serves H/KV consecutive query heads
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        if k_cap is not None:
            k_cap = k_cap.repeat_interleave(H // KV, dim=1)
    w = min(pattern.window, T)
    c = w
    nb = math.ceil(T / c)
    pad = nb * c - T
    g = min(pattern.n_global, T)
    caps = _capped_scores(q_cap, k_cap, g)
    if caps is not None:  # score band keys with q and global keys with q_cap: [q, q_cap] . [k, 0] and . [0, k_cap]
        q = torch.cat([q, caps[0]], dim=-1)
    q = F.pad(q, (0, 0, 0, pad))
    # keys padded by w - 1 on the left (nothing to see before token 0) and to nb * c on the right
    kp, vp = (F.pad(t, (0, 0, w - 1, pad)) for t in (k, v))
    L = c + w - 1
    kb = kp.unfold(2, L, c).transpose(-1, -2)  # (B, H, nb, L, hd)
    vb = vp.unfold(2, L, c).transpose(-1, -2)
    r = torch.arange(c, device=q.device)[:, None]
    s = torch.arange(L, device=q.device)[None, :]
    b = torch.arange(nb, device=q.device)[:, None, None]
    key_pos = b * c - (w - 1) + s  # (nb, 1, L) absolute position of each key slot
    band = (s >= r) & (s <= r + w - 1) & (key_pos >= 0)  # (nb, c, L): 0 <= i - j < w
    if g:
        qpos = b * c + r  # (nb, c, 1)
        gpos = torch.arange(g, device=q.device)[None, None, :]
        seen = qpos - gpos >= w  # global keys the band does not already cover (and causal)
        kg = k[:, :, :g]
        if caps is not None:
            kb = torch.cat([kb, torch.zeros_like(kb)], dim=-1)
            kg = torch.cat([torch.zeros_like(caps[1]), caps[1]], dim=-1)
        kb = torch.cat([kg[:, :, None].expand(B, H, nb, g, kg.shape[-1]), kb], dim=3)
        vb = torch.cat([v[:, :, None, :g].expand(B, H, nb, g, hd), vb], dim=3)
        band = torch.cat([seen, band], dim=2)  # (nb, c, g + L)
    qb = q.view(B, H, nb, c, q.shape[-1])
    y = F.scaled_dot_product_attention(
        qb.reshape(B, H * nb, c, -1),
        kb.reshape(B, H * nb, -1, kb.shape[-1]),
        vb.reshape(B, H * nb, -1, hd),
        attn_mask=band.repeat(H, 1, 1)[None],
        scale=hd**-0.5,
    )  # (B, H*nb, c, hd)
    return y.view(B, H, nb * c, hd)[:, :, :T]


def masked_pattern_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    pattern: Pattern,
    q_cap: torch.Tensor | None = None,
    k_cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """``pattern`` combined with a dense bool ``mask`` (B or 1, 1, T, T), e.g. a document mask.

    Without capping this is SDPA under mask & pattern_mask. With ``q_cap``/``k_cap`` (as in
    :func:`banded_attention`) the n_global leading keys are added again in front, scored as
    q_cap . k_cap and visible only outside the window, while the original keys keep the window."""
    T = q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    g = min(pattern.n_global, T)
    caps = _capped_scores(q_cap, k_cap, g)
    if caps is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask & pattern_mask(T, pattern, q.device), enable_gqa=gqa
        )
    q_cap, k_cap = caps
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(g, device=q.device)[None, :]
    outside = i - j >= pattern.window  # (T, g) global keys a query sees at the capped distance
    full_mask = torch.cat([mask[..., :g] & outside, mask & pattern_mask(T, Pattern(pattern.window), q.device)], -1)
    qq = torch.cat([q, q_cap], dim=-1)
    kk = torch.cat(
        [torch.cat([torch.zeros_like(k_cap), k_cap], dim=-1), torch.cat([k, torch.zeros_like(k)], dim=-1)], dim=2
    )
    vv = torch.cat([v[:, :, :g], v], dim=2)
    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=full_mask, scale=q.shape[-1] ** -0.5, enable_gqa=gqa)


def check_attention_knob(value: object) -> AttentionSpec:
    """The ``attention`` knob's validator: a kind name or a mapping -> AttentionSpec."""
    if isinstance(value, AttentionSpec):
        return value
    if isinstance(value, str):
        return AttentionSpec.model_validate({"kind": value})
    if isinstance(value, dict):
        return AttentionSpec.model_validate(value)
    raise ValueError(
        f"knob 'attention' takes causal | window | sinks or a mapping such as "
        f"{{kind: window, full_every: 3}}, got {value!r}"
    )
