"""Growing the reference model at a stage boundary: depth, MLP width and residual width.

Knobs: ``depth`` with ``growth`` (``zero``: new blocks on top whose residual output projections, ``o_proj``
and ``w2``, start at zero; ``stack``: block i copies block ``i mod n``, StackBERT), ``mlp_width``
(Net2WiderNet: copied units, each copied ``w2`` column divided among its copies), ``width`` (the residual
stream times a whole k, bert2BERT with whole copies, :func:`widen_model`) and ``growth_noise``, which breaks
the copies' symmetry. ``zero``, ``mlp_width`` and ``width`` are function-preserving (tested with
assert_close); ``stack`` only starts each new block equal to the block it copies. A width that is not a
whole multiple is refused (partial copies change every RMSNorm's mean square); Hugging Face models refuse
all three. Old parameters keep their AdamW moments, new or reshaped ones restart, and the optimizer's groups
are re-laid in the order a model built at the grown size has, so a run killed after a growth resumes
bitwise into the grown model. See docs/transitions.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rampup.engine.checkpoint.format import model_shapes, verify_checkpoint
from rampup.errors import ConfigError
from rampup.models.llm import Block
from rampup.schedule.registry import Family, Knob, register_family, register_knob
from rampup.seeding import generator, normal_, untouched_rng


def _check_method(value: Any) -> str:
    if value not in ("zero", "stack"):
        raise ValueError(f"knob 'growth' takes zero (function-preserving) or stack, got {value!r}")
    return value


@torch.no_grad()
def grow(
    adapter: Any,
    depth: int,
    method: str = "zero",
    optimizer: torch.optim.Optimizer | None = None,
    *,
    seed: int = 0,
    step: int = 0,
) -> bool:
    """Grow the reference model to ``depth`` blocks in place (and the optimizer's groups); False if it
    already has them. New block i draws its weights from its own generator, (``seed``, block i, ``step``:
    rampup.seeding), never from torch's global one, so a resumed run grows the same blocks."""

    module = adapter.module
    n = len(module.layers)
    if depth <= n:
        if depth < n:
            raise ConfigError(f"depth {depth}: the model already has {n} blocks; depth only grows")
        return False
    cfg = module.cfg.model_copy(update={"n_layers": depth})
    like = module.tok_emb.weight
    std = cfg.init_std
    for i in range(n, depth):
        with torch.device(like.device), untouched_rng(like.device):
            block = Block(cfg)  # fp32 like the reference model (built in place: fake and meta models too)
        gen = generator(seed, f"growth.block{i}", step)
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                normal_(m.weight, std, gen)
            elif isinstance(m, torch.nn.RMSNorm):
                torch.nn.init.ones_(m.weight)
        if method == "stack":
            block.load_state_dict(module.layers[i % n].state_dict())
        else:
            for w in (block.attn.o_proj.weight, block.mlp.w2.weight):
                torch.nn.init.zeros_(w)
        module.layers.append(block)
    module.cfg = cfg
    module.attn_patterns = list(module.attn_patterns) + [None] * (depth - n)  # the attention knob re-applies
    if optimizer is not None:
        relayout(optimizer, module)
    return True


def relayout(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    """Put every parameter of ``module`` in the optimizer, in the order a freshly built optimizer has;
    moments stay with their parameters (``optimizer.state`` is keyed by them)."""
    names = dict(module.named_parameters())
    order = list(names.values())
    groups = optimizer.param_groups
    by_name = {g.get("name"): g for g in groups}
    extra = [g for g in groups if g.get("name") not in {"decay", "no_decay", *names}]
    if "decay" in by_name and "no_decay" in by_name:
        by_name["decay"]["params"] = [p for p in order if p.dim() >= 2]
        by_name["no_decay"]["params"] = [p for p in order if p.dim() < 2]
        optimizer.param_groups[:] = [by_name["decay"], by_name["no_decay"], *extra]
        return
    template = next(g for g in groups if g.get("name") in names)
    decay = max(g["weight_decay"] for g in groups if g.get("name") in names)
    for name, p in names.items():
        if name not in by_name:
            optimizer.add_param_group(
                {k: v for k, v in template.items() if k != "params"}
                | {"name": name, "params": [p], "lr_mult": 1.0, "weight_decay": decay if p.dim() >= 2 else 0.0}
            )
    by_name = {g.get("name"): g for g in optimizer.param_groups}
    optimizer.param_groups[:] = [by_name[name] for name in names] + extra


@torch.no_grad()
def widen_mlp(
    adapter: Any,
    hidden: int,
    noise: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    step: int = 0,
) -> bool:
    """Widen every MLP of the reference model to ``hidden`` units in place (Net2WiderNet, see above)."""
    module = adapter.module
    old = module.layers[0].mlp.w1.weight.shape[0]
    if hidden <= old:
        if hidden < old:
            raise ConfigError(f"mlp_width {hidden}: the MLPs already have {old} units; the width only grows")
        return False
    src = torch.arange(hidden) % old
    counts = torch.tensor(
        [hidden // old + (j < hidden % old) for j in range(old)],  # copies of each unit
        dtype=module.tok_emb.weight.dtype,
    )

    g = generator(seed, "growth.mlp_width", step)
    replaced = {}
    for layer in module.layers:
        mlp = layer.mlp
        w1, w3, w2 = mlp.w1.weight, mlp.w3.weight, mlp.w2.weight
        n1, n3 = w1[src].clone(), w3[src].clone()
        if noise:
            n1[old:] += noise * module.cfg.init_std * torch.randn(n1[old:].shape, generator=g).to(n1)
        n2 = w2[:, src] / counts[src].to(w2)
        for lin, new in ((mlp.w1, n1), (mlp.w3, n3), (mlp.w2, n2)):
            p = torch.nn.Parameter(new, requires_grad=lin.weight.requires_grad)
            replaced[id(lin.weight)] = p
            lin.weight = p
            lin.in_features, lin.out_features = new.shape[1], new.shape[0]
    module.cfg = module.cfg.model_copy(update={"ffn_hidden": hidden})
    _swap_in_optimizer(optimizer, replaced)  # a widened matrix's moments restart
    return True


@torch.no_grad()
def widen_model(
    adapter: Any,
    dim: int,
    noise: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    step: int = 0,
) -> bool:
    """Widen the residual stream of the reference model to ``dim`` (an integer multiple k of its width) in
    place, function-preservingly (bert2BERT's function-preserving initialisation, with whole copies):

    - every residual coordinate is repeated k times, unscaled: the embedding's columns and the output rows
      of every matrix writing into the stream (``o_proj``, ``w2``) are tiled;
    - the heads are repeated k times (head size fixed, so RoPE is unchanged; key/value heads too, so the
      grouping of query heads stays);
    - every matrix reading the stream (``q/k/v_proj``, ``w1``, ``w3``, an untied head) has its input
      columns tiled and divided by k, and ``o_proj`` its input columns (the heads' outputs) too;
    - RMSNorm weights are tiled: the norm of k whole copies equals the copies of the norm, exactly
      (the mean square is the same, so even eps acts the same), which partial copies would not give.
      A tied head reads the tiled embedding, so the final norm's weight is also divided by k.

    ``noise`` adds that fraction of the init std to the copies' rows (heads and stream coordinates) to
    break their symmetry (then only approximately preserving). Every matrix changes shape, so every
    AdamW moment restarts."""
    module = adapter.module
    old = module.tok_emb.weight.shape[1]
    if dim <= old:
        if dim < old:
            raise ConfigError(f"width {dim}: the model is already {old} wide; the width only grows")
        return False
    if dim % old:
        raise ConfigError(
            f"width {dim} is not a multiple of the model's width {old}: function-preserving "
            f"widening repeats every coordinate equally (choose {2 * old}, {3 * old}, ...)"
        )
    k = dim // old
    t = _Tiler(k, dim, noise, module.cfg.init_std, seed, step)
    tied = module.lm_head.weight is module.tok_emb.weight
    t.put(module.tok_emb, "weight", t.noisy(module.tok_emb.weight.t().repeat(k, 1), old).t())
    module.tok_emb.embedding_dim = dim
    for layer in module.layers:
        t.widen_block(layer)
    t.norm(module.norm, 1.0 / k if tied else 1.0)
    if tied:
        module.lm_head.weight = module.tok_emb.weight
    else:
        t.put(module.lm_head, "weight", t.in_cols(module.lm_head.weight))
    module.lm_head.in_features = dim
    cfg = module.cfg
    module.cfg = cfg.model_copy(
        update={
            "dim": dim,
            "n_heads": cfg.n_heads * k,
            "ffn_hidden": cfg.hidden,
            "n_kv_heads": None if cfg.n_kv_heads is None else cfg.n_kv_heads * k,
        }
    )
    _swap_in_optimizer(optimizer, t.replaced)
    return True


class _Tiler:
    """The copies ``widen_model`` makes: k whole copies of every stream coordinate and head."""

    def __init__(self, k: int, dim: int, noise: float, std: float, seed: int, step: int) -> None:

        self.k, self.dim, self.noise, self.std = k, dim, noise, std
        self.gen = generator(seed, "growth.width", step)
        self.replaced: dict[int, torch.nn.Parameter] = {}
        """id(old parameter) -> its widened replacement."""

    def noisy(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        if self.noise:  # the copies only: the first ``rows`` rows stay the original's
            t[rows:] += self.noise * self.std * torch.randn(t[rows:].shape, generator=self.gen).to(t)
        return t

    def out_rows(self, w: torch.Tensor) -> torch.Tensor:
        """A matrix writing into the stream (or producing heads): its rows repeated."""
        return self.noisy(w.repeat(self.k, 1), w.shape[0])

    def in_cols(self, w: torch.Tensor) -> torch.Tensor:
        """A matrix reading the stream (or the copied heads): its columns repeated and divided by k."""
        return w.repeat(1, self.k) / self.k

    def put(self, owner: torch.nn.Module, attr: str, new: torch.Tensor) -> None:
        old_p = getattr(owner, attr)
        if id(old_p) in self.replaced:  # a tied weight, already widened
            setattr(owner, attr, self.replaced[id(old_p)])
            return
        p = torch.nn.Parameter(new.contiguous(), requires_grad=old_p.requires_grad)
        self.replaced[id(old_p)] = p
        setattr(owner, attr, p)

    def norm(self, n: torch.nn.RMSNorm, scale: float = 1.0) -> None:
        self.put(n, "weight", n.weight.repeat(self.k) * scale)
        n.normalized_shape = (self.dim,)

    def widen_block(self, layer: Block) -> None:
        a, m = layer.attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            self.put(lin, "weight", self.out_rows(self.in_cols(lin.weight)))  # heads repeated, wider stream read
        self.put(a.o_proj, "weight", self.out_rows(self.in_cols(a.o_proj.weight)))  # sums copied heads
        a.n_heads, a.n_kv = a.n_heads * self.k, a.n_kv * self.k
        for lin in (m.w1, m.w3):
            self.put(lin, "weight", self.in_cols(lin.weight))
        self.put(m.w2, "weight", self.out_rows(m.w2.weight))
        self.norm(layer.attn_norm)
        self.norm(layer.mlp_norm)
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.w1, m.w3, m.w2):
            lin.out_features, lin.in_features = lin.weight.shape


def _swap_in_optimizer(optimizer: torch.optim.Optimizer | None, replaced: dict[int, torch.nn.Parameter]) -> None:
    """Replaced (reshaped) parameters take their predecessors' places in the optimizer's groups; their
    moments restart."""
    if optimizer is None:
        return
    for p_old in list(optimizer.state):
        if id(p_old) in replaced:
            del optimizer.state[p_old]
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]


def checkpoint_width(path: Path) -> int | None:

    shape = model_shapes(path).get("norm.weight")  # the stream's width: the final norm's size
    return shape[0] if shape else None


def checkpoint_depth(path: Path) -> int | None:
    """How many blocks the reference model in a checkpoint folder has (None: no ``layers.N`` keys)."""

    idx = {int(k.split(".")[1]) for k in model_shapes(path) if k.startswith("layers.")}
    return max(idx) + 1 if idx else None


def checkpoint_mlp_width(path: Path) -> int | None:

    shape = model_shapes(path).get("layers.0.mlp.w1.weight")
    return shape[0] if shape else None


def fit_to_shapes(
    adapter: Any,
    dim: int | None,
    mlp_width: int | None,
    depth: int | None,
    optimizer: torch.optim.Optimizer | None = None,
    where: str = "the checkpoint",
) -> None:
    """Grow a reference model to a residual width, MLP width and depth (None: keep), as a run that grew
    left them; a model already past them cannot shrink back."""
    module = adapter.module
    if dim is not None and dim > module.tok_emb.weight.shape[1]:
        widen_model(adapter, dim, 0.0, optimizer)
    if mlp_width is not None and mlp_width > module.layers[0].mlp.w1.weight.shape[0]:
        widen_mlp(adapter, mlp_width, 0.0, optimizer)
    if depth is not None and depth > len(module.layers):
        grow(adapter, depth, "zero", optimizer)
    elif depth is not None and depth < len(module.layers):
        raise ConfigError(
            f"{where} holds a {depth}-block model but the run's model has already grown "
            f"to {len(module.layers)} blocks; a rollback cannot cross a growth (resume from a "
            "checkpoint after it)"
        )


def fit_to_tensors(adapter: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Grow a reference model to the architecture of a state dict (a snapshot, the EMA's shadows)."""
    if not hasattr(adapter.module, "tok_emb"):
        return
    layers = {int(k.split(".")[1]) for k in tensors if k.startswith("layers.")}
    fit_to_shapes(
        adapter,
        tensors["norm.weight"].shape[0] if "norm.weight" in tensors else None,
        tensors["layers.0.mlp.w1.weight"].shape[0] if "layers.0.mlp.w1.weight" in tensors else None,
        max(layers) + 1 if layers else None,
        where="the weights",
    )


def fit_to_checkpoint(
    adapter: Any, path: Path, optimizer: torch.optim.Optimizer | None = None, *, verify: bool = True
) -> None:
    """Grow a freshly built reference model to the architecture (width, MLP width, depth) of the
    checkpoint about to be loaded into it; ``verify`` first checks the checkpoint against its manifest
    (a damaged one is named, never read)."""
    if not hasattr(adapter.module, "layers") or not hasattr(adapter.module, "tok_emb"):
        return
    if verify:
        verify_checkpoint(path)
    fit_to_shapes(
        adapter,
        checkpoint_width(path),
        checkpoint_mlp_width(path),
        checkpoint_depth(path),
        optimizer,
        f"checkpoint {path}",
    )


def _apply_depth(ctx: Any, value: int) -> None:
    depth = int(value) or int(ctx.cfg.model.n_layers if ctx.cfg is not None else len(ctx.model.module.layers))
    if grow(ctx.model, depth, ctx.knobs.get("growth", "zero"), ctx.optimizer, seed=ctx.seed, step=ctx.step):
        ctx.structure += 1  # the new blocks take the memory knobs too


def _apply_width(ctx: Any, value: int) -> None:
    hidden = int(value) or ctx.model.module.layers[0].mlp.w1.weight.shape[0]
    if widen_mlp(ctx.model, hidden, float(ctx.knobs.get("growth_noise", 0.0)), ctx.optimizer, ctx.seed, ctx.step):
        ctx.structure += 1


def _apply_model_width(ctx: Any, value: int) -> None:
    dim = int(value) or ctx.model.module.tok_emb.weight.shape[1]
    if widen_model(ctx.model, dim, float(ctx.knobs.get("growth_noise", 0.0)), ctx.optimizer, ctx.seed, ctx.step):
        ctx.structure += 1


def _check_plan(cfg: Any, schedule: Any) -> None:
    last = cfg.model.n_layers
    for st in schedule.stages:
        d = int(st.knobs_at(st.start).get("depth", 0)) or cfg.model.n_layers
        if d < last:
            raise ConfigError(
                f"stage '{st.name}' sets depth {d} after {last}: depth only grows "
                f"(and starts at model.n_layers {cfg.model.n_layers} or more)"
            )
        last = d
    if cfg.model.source != "reference" and any(
        st.knobs_at(st.start).get(k, 0) for st in schedule.stages for k in ("depth", "mlp_width", "width")
    ):
        raise ConfigError("depth, mlp_width and width growth are built for the reference model only")
    if cfg.model.source != "reference":
        return
    last = cfg.model.dim
    for st in schedule.stages:
        knobs = st.knobs_at(st.start)
        w = int(knobs.get("width", 0)) or last
        if w < last or w % last:
            raise ConfigError(
                f"stage '{st.name}' sets width {w} after {last}: the residual width only grows, "
                f"by a whole multiple ({2 * last}, {3 * last}, ...), so that widening preserves "
                "the function"
            )
        if w != cfg.model.dim and any(
            s.knobs_at(s.start).get("distill_hidden") not in (None, "", "none") for s in schedule.stages
        ):
            raise ConfigError(
                f"stage '{st.name}' widens the model, but distill_hidden's learned projections are "
                "sized for the starting width; use logit distillation with a width growth"
            )
        last = w
    last = cfg.model.hidden if cfg.model.source == "reference" else 0
    for st in schedule.stages:
        w = int(st.knobs_at(st.start).get("mlp_width", 0)) or last
        if w < last:
            raise ConfigError(f"stage '{st.name}' sets mlp_width {w} after {last}: the width only grows")
        last = w


register_knob(
    Knob(
        "depth",
        "Blocks of the model from this stage on (0: model.n_layers); grows at the boundary, as knob 'growth' says.",
        default=0,
        integer=True,
        minimum=0,
        rampable=False,
        apply=_apply_depth,
        graph_key=lambda v: v,
        check_plan=_check_plan,
        restructures=True,
    )
)
register_knob(
    Knob(
        "mlp_width",
        "Hidden units of every MLP from this stage on (0: the model's own); widens "
        "function-preservingly (Net2WiderNet) at the boundary.",
        default=0,
        integer=True,
        minimum=0,
        rampable=False,
        apply=_apply_width,
        graph_key=lambda v: v,
        restructures=True,
    )
)
register_knob(
    Knob(
        "width",
        "Residual-stream width (model dim) from this stage on (0: model.dim); a whole multiple, "
        "widened function-preservingly (bert2BERT's FPI) at the boundary.",
        default=0,
        integer=True,
        minimum=0,
        rampable=False,
        apply=_apply_model_width,
        graph_key=lambda v: v,
        restructures=True,
    )
)
register_knob(
    Knob(
        "growth_noise",
        "Symmetry-breaking noise on widened units and heads, as a fraction of the init std.",
        default=0.0,
        minimum=0.0,
        rampable=False,
    )
)
register_knob(
    Knob(
        "growth",
        "How new blocks start: zero (function-preserving: zero output projections) or "
        "stack (copies of the existing blocks).",
        default="zero",
        rampable=False,
        check=_check_method,
    )
)


class GrowthFamily(Family):
    """A checkpoint of a grown model loads into a fresh one once the live model has taken its shapes."""

    name = "growth"

    def fit_checkpoint(self, model: Any, path: Path, optimizer: torch.optim.Optimizer | None) -> None:
        fit_to_checkpoint(model, path, optimizer, verify=False)  # the checkpointer verified it just before


register_family(GrowthFamily())
