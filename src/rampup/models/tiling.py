"""Memory techniques for long sequences, as plain PyTorch on any model adapter.

- :func:`tiled_head_loss`: head and loss over sequence shards, each shard's backward run inside the
  forward (TiledFusedLogitsLoss of ALST, Arctic Long Sequence Training), so the full (tokens x vocab)
  logits never exist; any per-shard loss fits (cross-entropy, a distillation KL).
- :func:`tile_mlp`: a block's MLP over sequence shards, each recomputed in backward (non-reentrant
  ``torch.utils.checkpoint``).
- :func:`checkpoint_block`: activation checkpointing of a block (``full``, or ``selective``: also keep
  the attention kernel's outputs), optionally offloading to pinned host memory (CUDA only).

Each acts by giving the module an instance-level ``forward`` (removed again when turned off), so
parameter names, state dicts and checkpoints are the same with and without it. See docs/memory.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from rampup.errors import ConfigError

ShardLoss = Callable[[torch.Tensor, slice], torch.Tensor]
"""loss_fn(logits of one shard (B, t, V), the shard's slice of the sequence) -> summed loss (scalar)."""


def _shard_step(shards: int, length: int, what: str) -> int:
    """Positions per shard; the last shard is shorter when ``shards`` does not divide the length
    (evaluation lengths; a training schedule is held to divisors at plan time)."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"{what} must be a whole number >= 1 (1: no tiling), got {shards!r}")
    return max(1, -(-length // shards))


# ----------------------------------------------------------------------------- tiled logits and loss


class _TiledHeadLoss(torch.autograd.Function):
    """Sum of ``loss_fn`` over sequence shards of ``hidden``; the gradients of the hidden states and
    of the head's parameters are computed shard by shard in forward and only scaled in backward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, head: nn.Module, loss_fn: ShardLoss, shards: int, *params: torch.Tensor
    ) -> torch.Tensor:
        T = hidden.shape[1]
        step = _shard_step(shards, T, "loss_shards")
        grad_hidden = torch.empty_like(hidden)
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            for a in range(0, T, step):
                sl = slice(a, a + step)
                h = hidden[:, sl].detach().requires_grad_(True)
                loss = loss_fn(head(h), sl)
                grads = torch.autograd.grad(loss, (h, *params), allow_unused=True)
                grad_hidden[:, sl] = grads[0]
                for i, g in enumerate(grads[1:]):
                    if g is not None:
                        prev = grad_params[i]
                        grad_params[i] = g if prev is None else prev + g
                total += loss.detach().float()
        ctx.save_for_backward(grad_hidden, *[g if g is not None else torch.zeros(()) for g in grad_params])
        ctx.has_grad = [g is not None for g in grad_params]
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, *grad_params = ctx.saved_tensors
        params = [g * grad_out.to(g.dtype) if has else None for g, has in zip(grad_params, ctx.has_grad, strict=True)]
        return grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None, *params


def tiled_head_loss(hidden: torch.Tensor, head: nn.Module, loss_fn: ShardLoss, shards: int) -> torch.Tensor:
    """``sum(loss_fn(head(hidden[:, s]), s) for s in shards)`` without ever holding all logits.

    With gradients enabled, each shard's backward through the head and the loss runs at once; the
    result's backward then passes the stored gradient of ``hidden`` on (and of the head's weights, a
    tied embedding included). Gradients equal the untiled computation's up to summation order.
    """
    step = _shard_step(shards, hidden.shape[1], "loss_shards")
    params = tuple(p for p in head.parameters() if p.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        total = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, hidden.shape[1], step):
            sl = slice(a, a + step)
            total = total + loss_fn(head(hidden[:, sl]), sl).float()
        return total
    return _TiledHeadLoss.apply(hidden, head, loss_fn, shards, *params)


# ----------------------------------------------------------------------------- tiled MLP


def _class_forward(module: nn.Module) -> Callable[..., Any]:
    return type(module).forward.__get__(module)


def _tiled_forward(inner: Callable[..., torch.Tensor], shards: int, x: torch.Tensor, *args: Any) -> torch.Tensor:
    # ``args`` (a sub-network's hidden units) go to every shard's recomputation as they came forward
    chunks = x.split(_shard_step(shards, x.shape[1], "mlp_shards"), dim=1)
    if not torch.is_grad_enabled():
        return torch.cat([inner(c, *args) for c in chunks], dim=1)
    return torch.cat([checkpoint(inner, c, *args, use_reentrant=False) for c in chunks], dim=1)


def tile_mlp(mlp: nn.Module, shards: int) -> None:
    """Run ``mlp`` (a module mapping (B, T, C) to (B, T, C) position-wise) over ``shards`` sequence
    shards, each recomputed in backward; ``shards`` 1 restores the plain forward."""
    mlp.__dict__.pop("forward", None)
    if shards > 1:
        mlp.forward = functools.partial(_tiled_forward, _class_forward(mlp), shards)


# ----------------------------------------------------------------------------- activation checkpointing

_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_attention(ctx: SelectiveCheckpointContext, op: object, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
    return create_selective_checkpoint_contexts(_keep_attention)


def _checkpointed_forward(inner: Callable[..., Any], mode: str, offload: bool, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    context_fn = _selective_contexts if mode == "selective" else noop_context_fn  # the latter: checkpoint's default
    if offload:
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def _offloaded_forward(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return inner(*args, **kwargs)


def checkpoint_block(block: nn.Module, mode: str, offload: bool = False) -> None:
    """mode ``none`` (plain), ``full`` or ``selective`` (keep the attention kernel's outputs) for one
    block; ``offload`` moves what the block keeps for backward to pinned host memory (CUDA)."""
    block.__dict__.pop("forward", None)
    inner = _class_forward(block)
    if mode in ("full", "selective"):
        block.forward = functools.partial(_checkpointed_forward, inner, mode, offload)
    elif mode != "none":
        raise ConfigError(f"activation checkpointing mode {mode!r} is not one of none, full, selective")
    elif offload:
        block.forward = functools.partial(_offloaded_forward, inner)
