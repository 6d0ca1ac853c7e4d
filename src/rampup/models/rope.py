"""RoPE context-extension methods as one spec: the ``rope`` schedule knob.

With theta_i = b^(-2i/d) and s = ``factor``: ``base`` (a raised base, ABF), ``pi`` (theta_i / s), ``ntk``
(b' = b * s^(d / (d - 2))), ``dynamic_ntk`` (the NTK base recomputed from each forward's length, Hugging
Face's rule) and ``yarn`` (Peng et al. 2024): theta'_i = theta_i * (1 - ramp_i) + (theta_i / s) * ramp_i,
ramp_i rising from 0 to 1 as i grows, so the high-frequency dims are kept and the low-frequency ones
interpolated, as the paper and ``transformers`` do (tests compare against it; do not swap the weights).
YaRN also scales attention logits by (0.1 ln s + 1)^2, as cos and sin each times 0.1 ln s + 1.

:func:`rope_frequencies` is the pure function; :func:`apply_rope_spec` sets it on a live
:class:`~rampup.models.llm.DecoderLM` (only the cached tables change). See docs/context.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from rampup.configbase import Section

if TYPE_CHECKING:
    from rampup.models.llm import DecoderLM

RopeMethod = Literal["base", "pi", "ntk", "dynamic_ntk", "yarn"]


class RopeSpec(Section):
    """How rotary positions are computed in a stage (knob ``rope``)."""

    method: RopeMethod = "base"
    """base (plain RoPE, base may change), pi, ntk, dynamic_ntk or yarn."""
    base: float | None = None
    """RoPE base b; None keeps model.rope_base. With pi/ntk/yarn it is the base being scaled."""
    factor: float = Field(default=1.0, gt=0)
    """The scale s = new context / original context, for pi, ntk, dynamic_ntk and yarn."""
    original_max_len: int | None = Field(default=None, ge=1)
    """The context the model was trained at before the extension (yarn, dynamic_ntk)."""
    beta_fast: float = Field(default=32.0, gt=0)
    """YaRN: dims rotating more than this many times over original_max_len are kept as they are."""
    beta_slow: float = Field(default=1.0, gt=0)
    """YaRN: dims rotating fewer than this many times are fully interpolated."""

    @model_validator(mode="after")
    def _check(self) -> RopeSpec:
        if self.base is not None and not self.base > 1:
            raise ValueError(f"rope.base must be > 1, got {self.base}")
        if self.method in ("yarn", "dynamic_ntk") and self.original_max_len is None:
            raise ValueError(
                f"rope method {self.method} needs original_max_len (the context trained at before the extension)"
            )
        if self.method == "base" and self.factor != 1.0:
            raise ValueError("rope method 'base' takes no factor; use pi, ntk or yarn to scale, or raise base")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"rope.beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})")
        return self

    def __str__(self) -> str:
        if self.method == "base":
            return "default" if self.base is None else f"base {self.base:g}"
        parts = [self.method, f"x{self.factor:g}"]
        if self.base is not None:
            parts.append(f"base {self.base:g}")
        if self.original_max_len:
            parts.append(f"from {self.original_max_len}")
        return " ".join(parts)


def _yarn_ramp(head_dim: int, base: float, original_max_len: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """ramp_i in [0, 1] over the head_dim/2 frequencies: 0 keeps theta_i, 1 divides it by s."""

    def dim_of(rotations: float) -> float:
        return head_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    half = head_dim // 2
    # clamped to the head dimension (not half of it), as the reference implementation does
    low = max(math.floor(dim_of(beta_fast)), 0)
    high: float = min(math.ceil(dim_of(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as the reference does
    i = torch.arange(half, dtype=torch.float32)
    return ((i - low) / (high - low)).clamp(0, 1)


def _original_max_len(spec: RopeSpec) -> int:
    """``original_max_len``, which RopeSpec's validation requires of yarn and dynamic_ntk."""
    if spec.original_max_len is None:
        raise ValueError(f"rope method {spec.method} needs original_max_len")
    return spec.original_max_len


def rope_frequencies(
    spec: RopeSpec, head_dim: int, model_base: float, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) fp32, attention scale applied to cos and sin) for ``spec``.

    ``seq_len`` is the length of the forward pass, used only by dynamic_ntk.
    """
    b = spec.base or model_base
    d = head_dim
    i = torch.arange(0, d, 2, dtype=torch.float32)
    s = spec.factor
    if spec.method == "ntk":
        b = b * s ** (d / (d - 2))
    elif spec.method == "dynamic_ntk":
        if seq_len is not None and seq_len > (original := _original_max_len(spec)):
            b = b * (s * seq_len / original - (s - 1)) ** (d / (d - 2))
    theta = 1.0 / (b ** (i / d))  # (d/2,)
    if spec.method == "pi":
        return theta / s, 1.0
    if spec.method == "yarn":
        ramp = _yarn_ramp(d, b, _original_max_len(spec), spec.beta_fast, spec.beta_slow)
        theta = theta * (1 - ramp) + (theta / s) * ramp
        return theta, (0.1 * math.log(s) + 1.0) if s > 1 else 1.0
    return theta, 1.0


def apply_rope_spec(model: DecoderLM, spec: RopeSpec, seq_len: int | None = None) -> None:
    """Set ``spec``'s frequencies on a DecoderLM in place (the cos/sin tables only)."""
    inv_freq, scale = rope_frequencies(spec, model.cfg.head_dim, model.cfg.rope_base, seq_len)
    model.set_rope(inv_freq=inv_freq, attention_scale=scale)


def check_rope_knob(value: object) -> RopeSpec:
    """The ``rope`` knob's validator: a mapping (or RopeSpec) -> RopeSpec."""
    if isinstance(value, RopeSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"knob 'rope' takes a mapping such as {{method: yarn, factor: 4, original_max_len: 512}}, got {value!r}"
        )
    return RopeSpec.model_validate(value)
