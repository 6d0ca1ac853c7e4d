"""Optimizer construction and the learning-rate schedule, counted in tokens.

The LR is a pure function of tokens seen (``lr_at``), so it needs no state of its own to resume, and a
schedule whose steps change size (seq-len or batch ramps) still warms up and decays over the right
share of the data.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import model_validator

from rampup.configbase import Section
from rampup.units import Duration, Unit


class OptimizerConfig(Section):
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms, not biases)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    warmup: Duration = Duration(2, Unit.FRACTION)
    """Linear warmup from 0, in tokens or % of the run ('2%', '200K tok')."""
    decay: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Shape after warmup: cosine or linear to min_lr_ratio*lr, or warmup-stable-decay (constant, then linear
    cooldown)."""
    cooldown: Duration = Duration(20, Unit.FRACTION)
    """For decay 'wsd': length of the final linear decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("optimizer.grad_clip must be > 0, or null to disable clipping")
        for name in ("warmup", "cooldown"):
            if getattr(self, name).unit not in (Unit.TOKEN, Unit.FRACTION):
                raise ValueError(
                    f"optimizer.{name} is counted in tokens: give tokens or % of the run "
                    f"(e.g. '2%' or '500K tok'), not {getattr(self, name)}"
                )
        return self


def lr_at(cfg: OptimizerConfig, t: int, total_tokens: int) -> float:
    """Learning rate at ``t`` of ``total_tokens`` tokens, before any ``lr_mult`` knob.

    The engine evaluates it at the token count reached by the end of each step (as nanoGPT's
    ``(it + 1) / warmup_iters``), so the first step of a warmup already moves the weights."""
    warmup = cfg.warmup.to_tokens(total_tokens=total_tokens)
    if t < warmup:
        return cfg.lr * t / warmup  # the engine asks at the end of each step, so the first lr is > 0
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "constant":
        return cfg.lr
    if cfg.decay == "wsd":
        cool = cfg.cooldown.to_tokens(total_tokens=total_tokens)
        start = max(total_tokens - cool, warmup)
        if t < start:
            return cfg.lr
        p = min(1.0, (t - start) / max(1, total_tokens - start))
        return cfg.lr + (lo - cfg.lr) * p
    p = min(1.0, (t - warmup) / max(1, total_tokens - warmup))
    if cfg.decay == "linear":
        return cfg.lr + (lo - cfg.lr) * p
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * p))


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, per_parameter: bool = False) -> torch.optim.AdamW:
    """AdamW over every parameter, in named groups (``decay``: matrices, ``no_decay``: norms and
    biases), each with its own ``lr_mult`` that the step multiplies into the learning rate.

    Every parameter is in the optimizer even if it does not require a gradient now: a frozen one
    simply gets no gradient (AdamW skips it), so the optimizer's state keeps one layout whatever
    trains, and a checkpoint from any stage loads in any other. ``per_parameter`` gives every parameter
    its own group (named by its first name; rampup.knobs.transitions sets their ``lr_mult``), for runs with
    learning-rate groups. ``fused``/``foreach`` are left to PyTorch's default."""
    params = list(model.parameters())  # de-duplicated: a tied weight appears once
    if per_parameter:  # lr_groups / lr_layer_decay: one group per parameter, named by its first name
        groups = [
            {"name": name, "params": [p], "weight_decay": cfg.weight_decay if p.dim() >= 2 else 0.0, "lr_mult": 1.0}
            for name, p in model.named_parameters()
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    groups = [
        {
            "name": "decay",
            "params": [p for p in params if p.dim() >= 2],
            "weight_decay": cfg.weight_decay,
            "lr_mult": 1.0,
        },
        {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
