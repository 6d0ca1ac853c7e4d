"""An exponential moving average of the weights, part of the run's state (``train.ema``).

After every applied optimizer step, each parameter's shadow moves toward it:
``shadow = decay * shadow + (1 - decay) * param`` with ``decay = 0.5 ** (step / half_life)``, the
step and the half-life both in tokens (a step of n tokens) or both in steps. The shadow weights are in
every checkpoint (``parts.safetensors``), so a resumed run continues the same average bitwise;
``train.ema.evaluate`` scores evaluations with them, and ``rampup export --ema`` exports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import model_validator

from rampup.configbase import Section
from rampup.errors import ConfigError
from rampup.schedule.registry import Family, KnobContext, RunSetup, register_family
from rampup.units import Duration, Unit


class EMAConfig(Section):
    """Exponential moving average of the weights."""

    half_life: Duration
    """After this many tokens ('20K tok'), steps ('100 steps') or, in an image run, images ('2000 samples') a
    weight's old value weighs half."""
    evaluate: bool = False
    """Score every evaluation (and the run's final losses) with the averaged weights instead of the raw ones."""

    @model_validator(mode="after")
    def _check(self) -> EMAConfig:
        if self.half_life.unit not in (Unit.TOKEN, Unit.STEP, Unit.SAMPLE) or not self.half_life.value > 0:
            raise ValueError(
                f"train.ema.half_life takes a positive number of tokens, steps or (an image run) images ('20K tok', "
                f"'100 steps', '2000 samples'), got {self.half_life}"
            )
        return self


def _averaged(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What the average follows: every parameter, and batch norms' running statistics (timm's ModelEmaV3
    averages them too: the averaged weights are evaluated with statistics of their own)."""
    stats = [(n, b) for n, b in module.named_buffers() if n.endswith((".running_mean", ".running_var"))]
    return [(n, p.detach()) for n, p in module.named_parameters()] + stats


class EMA:
    """The shadow weights of ``module``'s parameters and batch-norm statistics (a TrainState part)."""

    def __init__(self, module: torch.nn.Module, half_life: Duration) -> None:
        self.module, self.half_life = module, half_life
        self.shadow: dict[str, torch.Tensor] = {n: p.clone() for n, p in _averaged(module)}
        self.updates = 0

    def _follow(self) -> list[torch.Tensor]:
        """The shadows in the followed order; a parameter the model grew (or widened) starts at its own value."""
        followed = _averaged(self.module)
        for n, p in followed:
            if n not in self.shadow or self.shadow[n].shape != p.shape:  # grown, or widened: starts afresh
                self.shadow[n] = p.clone()
        return [self.shadow[n] for n, _ in followed]

    def decay(self, tokens: int) -> float:
        n = 1 if self.half_life.unit is Unit.STEP else tokens
        return 0.5 ** (n / self.half_life.value)

    @torch.no_grad()
    def update(self, tokens: int) -> None:
        torch._foreach_lerp_(self._follow(), [p for _, p in _averaged(self.module)], 1.0 - self.decay(tokens))
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "half_life": str(self.half_life)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])

    def tensors(self) -> dict[str, torch.Tensor]:
        self._follow()
        return dict(self.shadow)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        followed = dict(_averaged(self.module))
        missing = [n for n in followed if n not in tensors]
        if missing:
            raise ConfigError(
                f"the checkpoint holds no EMA weights for {missing[0]} (was it written before "
                "train.ema was set?); resume with the config the run started with"
            )
        self.shadow = {n: _like(tensors[n], p) for n, p in followed.items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block; its own come back bitwise after."""
        live = [p for _, p in _averaged(self.module)]
        with torch.no_grad():
            raw = [p.clone() for p in live]
            for p, s in zip(live, self._follow(), strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(live, raw, strict=True):
                    p.copy_(r)


def _like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor) laid out as ``param``: this rank's shard of it for an FSDP2 (DTensor) parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if hasattr(param, "device_mesh") and not hasattr(t, "device_mesh"):
        assert isinstance(param, DTensor)  # FSDP2's parameters are DTensors
        # every rank holds the whole tensor: each keeps its own shard, no communication
        return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return t.clone()


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on every rank (a collective), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def load_ema_weights(module: torch.nn.Module, part_tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put a checkpoint's EMA weights (its ``parts.safetensors``) into ``module``."""
    ema = {k[len("ema/") :]: v for k, v in part_tensors.items() if k.startswith("ema/")}
    if not ema:
        raise ConfigError(f"{where} holds no EMA weights; train with train.ema set, or export without --ema")
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(ema[name])
        for name, b in module.named_buffers():  # batch norms' averaged statistics, where the average holds them
            if name in ema:
                b.copy_(ema[name])


class EMAFamily(Family):
    """``train.ema``: the shadow weights are a checkpointed part, follow every applied step, and score the
    evaluations when ``train.ema.evaluate`` asks. First, so that a teacher may be the EMA."""

    name = "ema"
    order = -10

    def setup(self, run: RunSetup) -> None:
        if run.cfg.train.ema is not None:
            if run.cfg.train.ema.half_life.unit is Unit.SAMPLE and getattr(run.cfg, "images", None) is None:
                raise ConfigError(
                    f"train.ema.half_life {run.cfg.train.ema.half_life}: a language model's progress counts "
                    "tokens; give the half-life in tokens ('20K tok') or steps"
                )
            run.parts["ema"] = EMA(run.ctx.model.module, run.cfg.train.ema.half_life)

    def after_step(self, ctx: KnobContext, tokens: int) -> None:
        if "ema" in ctx.parts:
            ctx.parts["ema"].update(tokens)

    def evaluating(self, ctx: KnobContext) -> contextlib.AbstractContextManager:
        ema = ctx.parts.get("ema")
        if ema is None or ctx.cfg is None or not ctx.cfg.train.ema.evaluate:
            return contextlib.nullcontext()
        return ema.applied()


register_family(EMAFamily())
