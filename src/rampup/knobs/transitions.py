"""Stage transitions of what trains: freezing, learning-rate groups, optimizer state at a boundary.

Knobs: ``freeze`` (``none``, name globs, ``blocks:A-B``, ``bottom:K``, ``top:K``), ``lr_groups``
(multipliers by glob, each may ramp), ``lr_layer_decay`` (discriminative rates by depth, ULMFiT / BEiT)
and ``optimizer_state`` (``keep`` | ``reset`` | ``reset_new`` at the stage's first step).

Invariants: a frozen parameter gets no gradient (so no update and no decay) but stays in the optimizer,
so a checkpoint of any stage loads in any other. A tied weight is one parameter with several names: it
trains if any of them is trainable and takes the largest multiplier; a glob that selects only some of
its names is an error. DDP registers only trainable parameters, so the engine rebuilds its wrapper when
:func:`trainable_names` of the stage's knobs changes at a boundary. See docs/transitions.md.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch.nn as nn

from rampup.errors import ConfigError, did_you_mean
from rampup.schedule.ramps import evaluate_mapping, ramped_mapping
from rampup.schedule.registry import (
    KNOBS,
    Family,
    Knob,
    knob_keys_set,
    register_family,
    register_knob,
)

# ----------------------------------------------------------------------------- names


def parameter_names(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it goes by (a tied weight has several), in module order."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _block_of(name: str, blocks: list[str]) -> int | None:
    for i, b in enumerate(blocks):
        if name.startswith(b + "."):
            return i
    return None


def _embedding_names(adapter: Any) -> set[str]:
    """Names of the input-side parameters outside the blocks (token and position embeddings); a head
    tied to the embedding keeps its own name on the output side."""
    module = adapter.module
    emb_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    head_names = {
        f"{path}.weight" if path else "weight"
        for path, m in module.named_modules()
        if m is getattr(adapter, "head", None)
    }
    blocks = [n for n, _ in adapter.blocks()]
    return {
        name
        for name, p in module.named_parameters(remove_duplicate=False)
        if id(p) in emb_ids and _block_of(name, blocks) is None and name not in head_names
    }


# ----------------------------------------------------------------------------- freeze


def check_freeze(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"knob 'freeze' takes none | globs (comma-separated) | blocks:A-B | bottom:K | top:K, got {value!r}"
        )
    v = value.strip()
    kind, _, arg = v.partition(":")
    if kind in ("bottom", "top") and not (arg.isdigit() and int(arg) >= 0):
        raise ValueError(f"freeze '{v}': {kind}:K needs a whole K >= 0")
    if kind == "blocks" and not re.fullmatch(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*", arg):
        raise ValueError(f"freeze '{v}': blocks: takes indices and ranges, e.g. blocks:0-3,6")
    return v


def _indices(spec: str, arg: str, n: int) -> set[int]:
    out: set[int] = set()
    for part in (p.strip() for p in arg.split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if lo_i > hi_i or hi_i >= n:
            raise ConfigError(f"freeze '{spec}': block {part} does not exist; the model has blocks 0-{n - 1}")
        out |= set(range(lo_i, hi_i + 1))
    return out


def frozen_names(spec: str, adapter: Any) -> set[str]:
    """Every parameter name ``spec`` selects (before the tied-weight rule)."""
    all_names = [n for n, _ in adapter.module.named_parameters(remove_duplicate=False)]
    blocks = [n for n, _ in adapter.blocks()]
    n = len(blocks)
    if spec == "none":
        return set()
    kind, _, arg = spec.partition(":")
    if kind in ("bottom", "top", "blocks"):
        if kind == "blocks":
            chosen = _indices(spec, arg, n)
        else:
            k = int(arg)
            if k > n:
                raise ConfigError(f"freeze '{spec}': the model has only {n} blocks")
            chosen = set(range(k)) if kind == "bottom" else set(range(n - k, n))
        out = {name for name in all_names if _block_of(name, blocks) in chosen}
        emb = _embedding_names(adapter)
        if kind == "bottom" and int(arg) > 0:
            out |= emb
        if kind == "top" and int(arg) > 0:  # the final norm and the head: what lies above the blocks
            out |= {name for name in all_names if _block_of(name, blocks) is None and name not in emb}
        return out
    out = set()
    for glob in (g.strip() for g in spec.split(",") if g.strip()):
        hit = {name for name in all_names if fnmatch.fnmatchcase(name, glob)}
        if not hit:
            raise ConfigError(
                f"freeze: the glob '{glob}' matches no parameter{did_you_mean(glob, all_names)}; "
                f"names look like {', '.join(all_names[:3])} ..."
            )
        out |= hit
    return out


def trainable_names(spec: str, adapter: Any) -> set[str]:
    """Names of the parameters that train under ``spec`` (the tied-weight rule applied)."""
    frozen = frozen_names(spec, adapter)
    explicit = spec != "none" and spec.partition(":")[0] not in ("bottom", "top", "blocks")
    out = set()
    for names in parameter_names(adapter.module).values():
        hit = [n for n in names if n in frozen]
        if explicit and hit and len(hit) < len(names):
            raise ConfigError(
                f"freeze '{spec}' selects {hit[0]} but not {[n for n in names if n not in frozen][0]}, "
                "which is the same (tied) parameter; select both names or neither"
            )
        if len(hit) < len(names):  # trainable if any of its names is
            out |= set(names)
    return out


def _apply_trainable(ctx: Any, value: Any) -> None:
    spec = ctx.knobs.get("freeze", "none")
    train = trainable_names(spec, ctx.model)
    ids = parameter_names(ctx.model.module)
    for p in ctx.model.module.parameters():
        p.requires_grad_(ids[id(p)][0] in train)


# ----------------------------------------------------------------------------- lr groups


def check_lr_groups(value: Any) -> dict[str, Any]:
    """{glob: multiplier}, each multiplier a number >= 0 or a ramp across the stage ({from: 0.01, to: 1})."""
    return ramped_mapping(value, "lr_groups", "multiplier", "{'layers.0.*': 0.1}")


evaluate_lr_groups = evaluate_mapping
"""lr_groups at stage progress p: every ramping multiplier at its value there."""


def lr_multipliers(adapter: Any, groups: dict[str, float], layer_decay: float) -> dict[str, float]:
    """Per parameter (its first name), the product of its glob multiplier (the last glob that matches
    wins, as in a config read top-down) and its depth factor; a tied weight takes its largest."""
    all_names = [n for n, _ in adapter.module.named_parameters(remove_duplicate=False)]
    for glob in groups:
        if not any(fnmatch.fnmatchcase(n, glob) for n in all_names):
            raise ConfigError(f"lr_groups: the glob '{glob}' matches no parameter{did_you_mean(glob, all_names)}")
    blocks = [n for n, _ in adapter.blocks()]
    n = len(blocks)
    emb = _embedding_names(adapter)

    def one(name: str) -> float:
        m = 1.0
        for glob, v in groups.items():
            if fnmatch.fnmatchcase(name, glob):
                m = v
        if layer_decay != 1.0:
            b = _block_of(name, blocks)
            depth = -1 if name in emb else (n if b is None else b)
            m *= layer_decay ** -(n - depth)
        return m

    return {names[0]: max(one(x) for x in names) for names in parameter_names(adapter.module).values()}


def _apply_lr_groups(ctx: Any, value: Any) -> None:
    groups, decay = ctx.knobs.get("lr_groups") or {}, float(ctx.knobs.get("lr_layer_decay", 1.0))
    if ctx.optimizer is None:
        return
    mults = lr_multipliers(ctx.model, groups, decay)
    for g in ctx.optimizer.param_groups:
        if g.get("name") in mults:
            g["lr_mult"] = mults[g["name"]]
        elif groups or decay != 1.0:
            raise ConfigError(
                "lr_groups / lr_layer_decay need one optimizer group per parameter; the optimizer "
                "was built without them (build_optimizer(..., per_parameter=True))"
            )


def uses_parameter_groups(schedule_cfg: Any) -> bool:
    """Whether the schedule sets lr_groups or lr_layer_decay anywhere (the optimizer then has one group per
    parameter, for the whole run, so its layout never changes)."""

    return any(
        k in knob_keys_set(schedule_cfg)
        and any(
            v is not None and v != KNOBS[k].default
            for v in [schedule_cfg.knobs.get(k)] + [st.knobs.get(k) for st in schedule_cfg.stages]
        )
        for k in ("lr_groups", "lr_layer_decay")
    )


# ----------------------------------------------------------------------------- optimizer state


def _check_state_policy(value: Any) -> str:
    if value not in ("keep", "reset", "reset_new"):
        raise ValueError(f"knob 'optimizer_state' takes keep | reset | reset_new, got {value!r}")
    return value


def _on_stage_state(ctx: Any, value: str, previous: dict[str, Any]) -> None:
    """At a stage's first step: reset AdamW's moments (and step count) of all or of the newly trainable."""
    if value == "keep" or ctx.optimizer is None:
        return
    ids = parameter_names(ctx.model.module)
    if value == "reset":
        chosen = list(ctx.model.module.parameters())
    else:
        before = trainable_names(previous.get("freeze", "none"), ctx.model)
        now = trainable_names(ctx.knobs.get("freeze", "none"), ctx.model)
        chosen = [p for p in ctx.model.module.parameters() if ids[id(p)][0] in now - before]
    for p in chosen:
        ctx.optimizer.state.pop(p, None)


def trainable_count(adapter: Any) -> int:
    return sum(p.numel() for p in adapter.module.parameters() if p.requires_grad)


def backward_flops_saved(adapter: Any) -> float:
    """Matmul FLOPs per token that freezing saves (a lower bound: attention's own backward in a frozen
    prefix is not counted): 2 x weights for each frozen matmul weight (no weight gradient), and 2 x
    weights more for the blocks of a frozen prefix, into which no backward runs at all."""
    module = adapter.module
    emb_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    head = getattr(adapter, "head", None)
    head_w = getattr(head, "weight", None)
    saved = 0.0
    for p in module.parameters():
        if not p.requires_grad and p.dim() >= 2 and (id(p) not in emb_ids or p is head_w):
            saved += 2.0 * p.numel()
    embeddings_frozen = all(not p.requires_grad for p in module.parameters() if id(p) in emb_ids and p is not head_w)
    if embeddings_frozen:
        for _, block in adapter.blocks():
            params = list(block.parameters())
            if any(p.requires_grad for p in params):
                break
            saved += sum(2.0 * p.numel() for p in params if p.dim() >= 2)
    return saved


register_knob(
    Knob(
        "freeze",
        "What does not train: none | globs | blocks:A-B | bottom:K | top:K (gradual unfreezing: one stage per K).",
        default="none",
        rampable=False,
        check=check_freeze,
        apply=_apply_trainable,
        graph_key=lambda v: v,
        check_model=lambda a, v: trainable_names(v, a),
    )
)
register_knob(
    Knob(
        "lr_groups",
        "Learning-rate multipliers by parameter-name glob, e.g. {'layers.*': 0.01}.",
        default={},
        rampable=False,
        check=check_lr_groups,
        apply=_apply_lr_groups,
        evaluate_value=evaluate_lr_groups,
        key=lambda v, k, n: (tuple(sorted((v or {}).items())), k.get("lr_layer_decay", 1.0)),
        check_model=lambda a, v: lr_multipliers(a, evaluate_lr_groups(v, 0.0), 1.0),
    )
)
register_knob(
    Knob(
        "lr_layer_decay",
        "Discriminative learning rates: block l-1 trains at block l's lr / this factor (1: off).",
        default=1.0,
        minimum=1.0,
        apply=_apply_lr_groups,
        key=lambda v, k, n: (tuple(sorted((k.get("lr_groups") or {}).items())), v),
    )
)
register_knob(
    Knob(
        "optimizer_state",
        "At the stage's first step: keep | reset (all moments) | reset_new (of the "
        "parameters the stage makes trainable).",
        default="keep",
        rampable=False,
        check=_check_state_policy,
        on_stage=_on_stage_state,
    )
)


class TransitionsFamily(Family):
    """Freezing and lr groups need one optimizer group per parameter."""

    name = "transitions"

    def parameter_groups(self, cfg: Any) -> bool:
        return uses_parameter_groups(cfg.schedule)


register_family(TransitionsFamily())
