"""Training sampled sub-networks of the reference model (Once-for-All / BigNAS style), and extracting one.

Knob ``subnet``: ``none`` or ``depth:A-B,mlp:F-G``. At every step of a stage that sets it, a
sub-network is drawn (seeded by the run's seed and the step, so a resume draws the same ones): the
lowest ``d`` blocks, d uniform in A..B, each MLP keeping its first ``k`` hidden units, k / hidden
uniform in F..G (rounded to a multiple of 8). The step's loss is the full network's cross-entropy
plus the sub-network's KL to the full network's (detached) predictions: the full network is the
sub-networks' teacher (in-place distillation), and every weight a sub-network uses is shared. With
``loss_shards`` both networks' head and loss run tiled (their hidden states side by side through the
shared head), so neither's full logits exist. A stage with ``subnet`` takes no other teacher.

``rampup export RUN OUT --subnet depth=2,mlp=0.5`` writes the chosen sub-network as a standalone
model (its blocks and MLP units sliced out); its outputs equal the sub-network's inside the full
model (tested).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from rampup.errors import ConfigError
from rampup.models.adapter import DecoderLMAdapter
from rampup.models.llm import DecoderLM
from rampup.models.tiling import tiled_head_loss
from rampup.protocols import Batch, unwrap
from rampup.schedule.registry import (
    Family,
    Knob,
    RunSetup,
    register_family,
    register_knob,
)
from rampup.seeding import py_random

_SPEC = re.compile(r"depth:(\d+)-(\d+),mlp:([0-9.]+)-([0-9.]+)")


def check_subnet(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"knob 'subnet' takes none or depth:A-B,mlp:F-G, got {value!r}")
    v = value.replace(" ", "")
    if v == "none":
        return v
    m = _SPEC.fullmatch(v)
    if m is None:
        raise ValueError(f"subnet '{value}' is not none or depth:A-B,mlp:F-G (e.g. depth:2-4,mlp:0.5-1.0)")
    a, b, f, g = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    if not (1 <= a <= b) or not (0 < f <= g <= 1):
        raise ValueError(f"subnet '{value}': need 1 <= A <= B blocks and 0 < F <= G <= 1 of the MLP")
    return v


def _ranges(spec: str) -> tuple[int, int, float, float]:
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise ConfigError(f"subnet '{spec}' is not depth:A-B,mlp:F-G (e.g. depth:2-4,mlp:0.5-1.0)")
    return int(m[1]), int(m[2]), float(m[3]), float(m[4])


def draw(spec: str, seed: int, step: int, n_layers: int, hidden: int) -> tuple[int, int]:
    """(depth, hidden units) of the sub-network of ``step``."""
    a, b, f, g = _ranges(spec)
    if b > n_layers:
        raise ConfigError(f"subnet '{spec}': the model has {n_layers} blocks")
    rng = py_random(seed, "subnet", step)
    depth = rng.randint(a, b)
    k = int(round(rng.uniform(f, g) * hidden / 8)) * 8
    return depth, min(hidden, max(8, k))


@contextlib.contextmanager
def active(adapter: Any, depth: int, hidden: int) -> Iterator[None]:
    """Forward passes inside the block run the sub-network. The model hands ``hidden`` to every block as an
    argument, so a checkpointed block or tiled MLP recomputes in backward (after the block has ended)
    the sub-network it ran forward, not the full one."""
    module = adapter.module
    module.active_depth, module.active_hidden = depth, hidden
    try:
        yield
    finally:
        module.active_depth = module.active_hidden = None


class SubnetTask:
    """The wrapped task's loss plus, when the step draws a sub-network, its KL to the full network."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.current: tuple[int, int] | None = None

    def make_batch(self, x: torch.Tensor, y: torch.Tensor, *, training: bool = True) -> Batch:
        return self.task.make_batch(x, y, training=training)

    def doc_lengths(self, batch: Batch) -> list[list[int]] | None:
        return self.task.doc_lengths(batch)

    def loss(self, adapter: Any, batch: Any, *, reduction: str = "mean") -> torch.Tensor:
        if self.current is None or reduction == "none" or not torch.is_grad_enabled():
            return self.task.loss(adapter, batch, reduction=reduction)
        out = adapter.forward(batch)
        # bf16: autocast caches the weights' casts for the rest of the step's region, so the sub-network's
        # blocks would cast nothing forward, while their recomputation in backward (a selectively
        # checkpointed block, in its own autocast region) casts each weight: the op sequences would differ.
        # Without the cache both cast each weight once.
        torch.clear_autocast_cache()
        with active(adapter, *self.current):
            sub = adapter.forward(batch)
        targets = batch.targets
        rows = targets.shape[0]

        def shard_loss(logits: torch.Tensor, sl: slice) -> torch.Tensor:
            # rows [0, B): the full network (cross-entropy); [B, 2B): the sub-network, taught by it
            full, s_logits = logits[:rows].float(), logits[rows:].float()
            ce = F.cross_entropy(full.flatten(0, 1), targets[:, sl].flatten(), reduction="sum")
            kd = F.kl_div(
                F.log_softmax(s_logits, -1), F.log_softmax(full.detach(), -1), log_target=True, reduction="sum"
            )
            return ce + kd

        both = torch.cat([out.hidden, sub.hidden])  # the head is shared: one pass over both
        if out.loss_shards > 1:  # tiled: neither network's full logits ever exist
            total = tiled_head_loss(both, out.head, shard_loss, out.loss_shards)
        else:
            total = shard_loss(out.head(both), slice(None))
        return total / targets.numel() if reduction == "mean" else total


def _on_batch(ctx: Any, batch: Any, value: str) -> None:
    task = unwrap(ctx.task, SubnetTask)
    if task is None:
        return
    if value == "none":
        task.current = None
        return
    space = getattr(ctx.model, "subnet_space", None)  # an image classifier's (the ResNet's) own ranges
    n_layers, hidden = space() if space is not None else (ctx.model.cfg.n_layers, ctx.model.cfg.hidden)
    task.current = draw(value, ctx.seed, ctx.step, n_layers, hidden)


def _check_plan(cfg: Any, schedule: Any) -> None:
    for st in schedule.stages:
        k = st.knobs_at(st.start)
        v = k.get("subnet", "none")
        if v == "none":
            continue
        _check_model(cfg, v, st.name)
        if k.get("teacher", "none") != "none":
            raise ConfigError(
                f"subnet in stage '{st.name}' comes with its own teacher (the full network teaches "
                "its sub-networks); remove the stage's teacher, or train the sub-networks in a "
                "stage without one"
            )


def _check_model(cfg: Any, spec: str, stage: str) -> None:
    images = getattr(cfg, "images", None)
    if images is not None:
        if images.model.arch != "resnet":
            raise ConfigError(
                f"subnet in stage '{stage}': sub-networks are built for the ResNet, not a {images.model.arch}"
            )
        if _ranges(spec)[1] > max(images.model.depths):
            raise ConfigError(
                f"subnet '{spec}' in stage '{stage}': the ResNet's deepest stage has {max(images.model.depths)} "
                "blocks (an image run's depth counts blocks per stage)"
            )
        return
    if cfg.model.source != "reference":
        raise ConfigError("subnet training is built for the reference model and the ResNet only")
    if _ranges(spec)[1] > cfg.model.n_layers:
        raise ConfigError(f"subnet '{spec}' in stage '{stage}': the model has {cfg.model.n_layers} blocks")


def uses_subnets(schedule_cfg: Any) -> bool:
    vals = [schedule_cfg.knobs.get("subnet")] + [st.knobs.get("subnet") for st in schedule_cfg.stages]
    return any(v not in (None, "none") for v in vals)


def parse_export(spec: str) -> tuple[int, float]:
    m = re.fullmatch(r"depth=(\d+),mlp=([0-9.]+)", spec.replace(" ", ""))
    if m is None or not 0 < float(m[2]) <= 1 or int(m[1]) < 1:
        raise ConfigError(f"--subnet '{spec}' is not depth=D,mlp=F (e.g. depth=2,mlp=0.5)")
    return int(m[1]), float(m[2])


@torch.no_grad()
def extract(adapter: Any, depth: int, hidden: int) -> DecoderLMAdapter:
    """A standalone reference model holding the sub-network's weights (blocks and MLP units sliced)."""

    module = adapter.module
    if depth > len(module.layers) or not 0 < hidden <= module.cfg.hidden:
        raise ConfigError(
            f"sub-network depth {depth} / {hidden} MLP units is not inside this model "
            f"({len(module.layers)} blocks, {module.cfg.hidden} units)"
        )
    cfg = module.cfg.model_copy(update={"n_layers": depth, "ffn_hidden": hidden})
    small = DecoderLM(cfg)
    state: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict().items():
        if k.startswith("layers."):
            i = int(k.split(".")[1])
            if i >= depth:
                continue
            if k.endswith(("mlp.w1.weight", "mlp.w3.weight")):
                v = v[:hidden]
            elif k.endswith("mlp.w2.weight"):
                v = v[:, :hidden]
        state[k] = v.clone()
    small.load_state_dict(state)
    small.set_rope(inv_freq=module.inv_freq, max_seq_len=module.max_seq_len, attention_scale=module.attention_scale)
    small.rope_base = module.rope_base
    small.set_attention(module.attn_patterns[:depth])
    return DecoderLMAdapter(small)


register_knob(
    Knob(
        "subnet",
        "Train a sampled sub-network each step with the full network as its teacher: none | depth:A-B,mlp:F-G.",
        default="none",
        rampable=False,
        check=check_subnet,
        on_batch=_on_batch,
        check_plan=_check_plan,
    )
)


class SubnetFamily(Family):
    """Sampled sub-networks, taught by the full network: the task around every other family's."""

    name = "subnets"
    order = 10

    def setup(self, run: RunSetup) -> None:
        if uses_subnets(run.cfg.schedule):
            run.task = SubnetTask(run.task)


register_family(SubnetFamily())
