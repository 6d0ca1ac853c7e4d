"""Teachers and distillation per stage: cross-stage, progressive and progressive self-distillation.

Knobs: ``teacher`` (``none`` | ``ema`` | ``previous_stage`` | ``stage:NAME`` | ``run:PATH`` | ``hf:PATH``);
``distill_weight`` and ``label_weight`` (both may ramp): loss = ``label_weight * CE + distill_weight * T^2 *
KL(p_teacher^T || p_student^T)`` at ``distill_temperature`` T; ``distill_hidden`` / ``distill_hidden_weight``:
MSE between chosen student and teacher blocks, through a learned projection (trained, checkpointed) where
the widths differ. PS-KD (Kim et al. 2021) is ``previous_stage`` with weights a and 1 - a.

Invariants: a teacher runs without gradients, in eval mode, in the run's precision, never in the
optimizer, and shard by shard with the student (``loss_shards``), so neither model's full logits exist.
Snapshot teachers are taken from the live weights at the first step of the following stage and saved in
every checkpoint (``parts.safetensors``), so a resume is exact; every teacher, taken now or read back, is
rebuilt the same way (fresh model, weights, its stage's RoPE and attention knobs). A teacher with another
vocabulary is refused before any compute. See docs/transitions.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer
from torch.utils.hooks import RemovableHandle

from rampup.data.mixture import first_folder
from rampup.data.prepare import TOKENIZER, load_prepared_tokenizer
from rampup.engine.checkpoint.format import load_checkpoint, verify_checkpoint
from rampup.engine.runs import read_run
from rampup.errors import ConfigError, RampupError
from rampup.knobs.ema import full
from rampup.knobs.growth import fit_to_checkpoint, fit_to_tensors
from rampup.knobs.memory import STEP_HOOKS, _fake_adapter, _storage_bytes
from rampup.models.build import build_adapter
from rampup.models.hf import HFCausalLMAdapter
from rampup.models.tiling import tiled_head_loss
from rampup.protocols import Batch, ModelAdapter, unwrap
from rampup.schedule.registry import (
    Family,
    Knob,
    KnobContext,
    KnobRunner,
    RunSetup,
    register_family,
    register_knob,
)
from rampup.seeding import generator, normal_, untouched_rng

MODEL_KNOBS = ("rope", "attention", "window")
"""Knobs that shape a snapshot teacher as they shaped the model at its snapshot."""


def check_teacher(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"knob 'teacher' takes none | ema | previous_stage | stage:NAME | run:PATH | hf:PATH, got {value!r}"
        )
    v = value.strip()
    kind, _, arg = v.partition(":")
    if v in ("none", "previous_stage", "ema") or (kind in ("stage", "run", "hf") and arg.strip()):
        return v
    raise ValueError(f"teacher '{v}' is not one of none, ema, previous_stage, stage:NAME, run:PATH, hf:PATH")


def uses_teacher(schedule_cfg: Any) -> bool:
    vals = [schedule_cfg.knobs.get("teacher")] + [st.knobs.get("teacher") for st in schedule_cfg.stages]
    return any(v not in (None, "none") for v in vals)


# ----------------------------------------------------------------------------- the teacher part


class Teachers:
    """The run's teachers (a TrainState part): snapshots by stage name, built teachers by source."""

    def __init__(self, cfg: Any, schedule: Any, precision: str, device: torch.device | str = "cpu") -> None:
        self.cfg, self.schedule, self.precision, self.device = cfg, schedule, precision, device
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        """Stage name -> the model's weights at the end of that stage."""
        self._built: dict[str, Any] = {}
        self.active: Any = None
        self.active_name = "none"
        self.ema: Any = None
        """The run's EMA part (train.ema), for ``teacher: ema``."""
        self.fresh: Any = None
        """For a model that is not a language model (an image classifier): a callable giving a new adapter
        of the run's architecture, which snapshot and EMA teachers are loaded into."""

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": sorted(self.snapshots), "active": self.active_name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._built.clear()
        self.active, self.active_name = None, "none"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{stage}/{k}": v for stage, sd in self.snapshots.items() for k, v in sd.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.snapshots = {}
        for key, v in tensors.items():
            stage, _, name = key.partition("/")
            self.snapshots.setdefault(stage, {})[name] = v

    # -- snapshots and teachers
    @torch.no_grad()
    def refresh_from_ema(self, teacher: Any) -> None:

        shadows = {k: full(v) for k, v in self.ema.tensors().items()}  # a sharded average is gathered
        params = dict(teacher.module.named_parameters())
        if not set(params) <= set(shadows) or any(p.shape != shadows[n].shape for n, p in params.items()):
            fit_to_tensors(teacher, shadows)  # the model grew since: the teacher follows
        for name, t in teacher.module.state_dict(keep_vars=True).items():
            if name in shadows:  # parameters, and batch norms' running statistics
                t.detach().copy_(shadows[name])

    def snapshot(self, stage_name: str, module: torch.nn.Module) -> None:
        # whole tensors: a sharded (FSDP2) model is gathered, on every rank at the same step
        self.snapshots[stage_name] = {k: full(v.detach()).clone() for k, v in module.state_dict().items()}
        self._built.pop(f"stage:{stage_name}", None)

    def select(self, spec: str, vocab_size: int) -> None:
        """Make ``spec`` the active teacher (built once per source)."""
        self.active_name = spec
        if spec == "none":
            self.active = None
            return
        if spec not in self._built:
            with untouched_rng():  # a model built to hold loaded weights draws nothing that training sees
                self._built[spec] = self._build(spec, vocab_size)
        self.active = self._built[spec]

    def _snapshot_of(self, stage: str) -> None:
        if stage not in self.snapshots:
            raise ConfigError(
                f"teacher 'stage:{stage}': stage '{stage}' has not ended yet, so there is no snapshot of it; "
                "a stage's snapshot teaches only the stages after it"
            )

    def _build(self, spec: str, vocab_size: int) -> ModelAdapter:

        kind, _, arg = spec.partition(":")
        adapter: ModelAdapter
        if self.fresh is not None and (spec == "ema" or kind == "stage"):  # a classifier: no RoPE, no growth
            adapter = self.fresh()
            if kind == "stage":
                self._snapshot_of(arg)
                adapter.module.load_state_dict(self.snapshots[arg])
        elif spec == "ema":  # its weights are the EMA's shadows, copied in before every use (DistillTask.loss)
            adapter = build_adapter(self.cfg.model, "cpu")
        elif kind == "stage":
            self._snapshot_of(arg)
            stage = next(s for s in self.schedule.stages if s.name == arg)
            adapter = build_adapter(self.cfg.model, "cpu")

            fit_to_tensors(adapter, self.snapshots[arg])  # the snapshot of a model that grew
            adapter.module.load_state_dict(self.snapshots[arg])
            knobs = self.schedule.at(stage.end - 1)
            KnobRunner(KnobContext(adapter, cfg=self.cfg, precision=self.precision)).apply(
                {k: v for k, v in knobs.items() if k in MODEL_KNOBS}, knobs["seq_len"]
            )
        elif kind == "run":
            adapter = load_run_teacher(arg)
        else:  # hf
            adapter = HFCausalLMAdapter.from_pretrained(arg)
        head_weight = adapter.head.weight
        assert isinstance(head_weight, torch.Tensor)  # every causal LM's head is a Linear (or tied embedding)
        teacher_vocab = head_weight.shape[0]
        if teacher_vocab != vocab_size:
            raise ConfigError(
                f"teacher '{spec}' has a vocabulary of {teacher_vocab} tokens, the run's model "
                f"{vocab_size}; a teacher must share the run's tokenizer (a classifier: its classes)"
            )
        adapter.module.to(self.device)  # built on the CPU from saved weights; it teaches on the run's device
        adapter.module.eval()
        for p in adapter.module.parameters():
            p.requires_grad_(False)
        return adapter


def load_run_teacher(path: str) -> ModelAdapter:
    """The model of a rampup run folder (its latest checkpoint) or of one checkpoint folder."""
    if not Path(path).exists():
        raise ConfigError(f"teacher run:{path}: no such folder; give a rampup run folder or checkpoint folder")

    saved = read_run(path, "a teacher")
    ckpt = saved.checkpoint
    with untouched_rng():  # its weights are the checkpoint's
        adapter = build_adapter(saved.model, "cpu")

    fit_to_checkpoint(adapter, ckpt)
    load_checkpoint(ckpt, adapter.module, None)
    return adapter


def check_static(cfg: Any, schedule_cfg: Any) -> None:
    """Plan-time checks: stage names exist and come before the stage they teach; folders exist."""
    names = [st.name for st in schedule_cfg.stages]
    for i, st in enumerate(schedule_cfg.stages):
        spec = st.knobs.get("teacher")
        if spec is None:
            continue
        kind, _, arg = spec.partition(":")
        if spec == "ema" and cfg.train.ema is None:
            raise ConfigError(
                "teacher: ema needs train.ema (the moving average it learns from); set train.ema.half_life"
            )
        if kind in ("run", "hf") and getattr(cfg, "images", None) is not None:
            raise ConfigError(
                f"teacher '{spec}' in an image run: an image classifier learns from ema, previous_stage or "
                "stage:NAME (its own snapshots); another run's or a Hugging Face model is a language model's teacher"
            )
        if spec == "previous_stage" and i == 0:
            raise ConfigError("teacher: previous_stage in the first stage: there is no previous stage")
        if kind == "stage" and arg not in names[:i]:
            raise ConfigError(
                f"teacher '{spec}' in stage {i} ('{st.name}'): the teacher must be an earlier stage "
                f"(earlier stages: {', '.join(names[:i]) or 'none'})"
            )
        if kind in ("run", "hf") and not Path(arg).exists():
            raise ConfigError(f"teacher '{spec}': no such folder")
        if kind == "hf" and not (Path(arg) / "config.json").is_file():
            raise ConfigError(f"teacher '{spec}': {arg} has no config.json; give a Hugging Face model folder")
        if kind == "run":  # a damaged or unreadable teacher checkpoint is named now, not at its stage
            try:
                verify_checkpoint(read_run(arg, "a teacher").checkpoint)
            except RampupError as e:
                raise ConfigError(f"teacher '{spec}' cannot be loaded: {e}") from None
        if kind in ("run", "hf"):
            vocab = _folder_vocab(kind, arg)
            if vocab is not None and vocab != cfg.model.vocab_size:
                raise ConfigError(
                    f"teacher '{spec}' has a vocabulary of {vocab} tokens, the run's model "
                    f"{cfg.model.vocab_size}; a teacher must share the run's tokenizer"
                )


def check_tokenizer(spec: str, cfg: Any, own: Any) -> None:
    """A run: or hf: teacher must tokenize as the run does: the same vocabulary, token for token.
    ``own`` is the run's tokenizer (tokenizers.Tokenizer); a teacher whose tokenizer cannot be found
    (a run not prepared here) is checked by vocabulary size only."""

    kind, _, arg = spec.partition(":")
    theirs = None
    if kind == "hf" and (Path(arg) / "tokenizer.json").is_file():
        theirs = Tokenizer.from_file(str(Path(arg) / "tokenizer.json"))
    elif kind == "run":
        folder = first_folder(read_run(arg, "a teacher").data)
        if (folder / TOKENIZER).is_file():
            theirs = Tokenizer.from_file(str(folder / TOKENIZER))
    if theirs is not None and theirs.get_vocab() != own.get_vocab():
        raise ConfigError(
            f"teacher '{spec}' tokenizes differently from this run (its vocabulary maps tokens to "
            "other ids); a teacher must share the run's tokenizer"
        )


def _folder_vocab(kind: str, arg: str) -> int | None:

    p = Path(arg)
    if kind == "hf":
        return json.loads((p / "config.json").read_text()).get("vocab_size")
    for folder in (p, *p.parents[:2]):
        if (folder / "config.yaml").is_file():
            return (yaml.safe_load((folder / "config.yaml").read_text()).get("model") or {}).get("vocab_size", 4096)
    return None


# ----------------------------------------------------------------------------- knob effects


def _on_stage(ctx: Any, value: Any, previous: dict[str, Any]) -> None:
    """At a stage's first step: snapshot the stage that just ended if a later stage learns from it."""
    teachers = ctx.parts.get("teachers")
    if teachers is None:
        return
    schedule = teachers.schedule
    idx = next(i for i, s in enumerate(schedule.stages) if s.start == ctx.tokens)
    ended = schedule.stages[idx - 1].name
    if value == "previous_stage" or any(
        s.knobs_at(s.start).get("teacher") == f"stage:{ended}" for s in schedule.stages[idx:]
    ):
        teachers.snapshot(ended, ctx.model.module)
    _apply_teacher(ctx, value)  # previous_stage names a new teacher at every stage


def _apply_teacher(ctx: Any, value: str) -> None:
    teachers = ctx.parts.get("teachers")
    if teachers is None:
        return
    spec = value
    if value == "previous_stage":
        schedule = teachers.schedule
        stage = next(s for s in reversed(schedule.stages) if s.start <= ctx.tokens)
        spec = f"stage:{schedule.stages[stage.index - 1].name}"
    teachers.select(spec, ctx.model.head.weight.shape[0])


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """'1:3,final:final' -> [('1', '3'), ('final', 'final')]; '' or 'none' -> []."""
    if spec in ("", "none"):
        return []
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        s, sep, t = part.partition(":")
        if not sep or not all(x == "final" or x.isdigit() for x in (s, t)):
            raise ValueError(
                f"distill_hidden '{spec}': each pair is STUDENT:TEACHER, a block index or 'final' "
                f"on each side (e.g. '1:3,final:final'), got '{part}'"
            )
        out.append((s, t))
    return out


def _check_pairs(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"knob 'distill_hidden' takes 'STUDENT:TEACHER,...' block pairs, got {value!r}")
    parse_pairs(value.strip())
    return value.strip()


def _check_layer(side: str, index: str, n: int, what: str) -> None:
    if index != "final" and int(index) >= n:
        raise ConfigError(
            f"distill_hidden: {side} block {index} does not exist; {what} has blocks 0-{n - 1} (or 'final')"
        )


def _capture(adapter: Any, wanted: set[str], store: dict[str, torch.Tensor]) -> list[RemovableHandle]:
    """Forward hooks that keep the outputs of the wanted blocks (by index) in ``store``."""
    hooks = []
    for i, (_, block) in enumerate(adapter.blocks()):
        if str(i) in wanted:

            def hook(m: torch.nn.Module, args: tuple[Any, ...], out: Any, i: int = i) -> None:
                store[str(i)] = out[0] if isinstance(out, tuple) else out

            hooks.append(block.register_forward_hook(hook))
    return hooks


class Projections:
    """Learned maps from student to teacher width, one per (teacher, pair) needing one (a TrainState part).
    Each map starts from its own generator, (run seed, its key: rampup.seeding)."""

    def __init__(self, seed: int = 0) -> None:
        self.maps = torch.nn.ModuleDict()
        self.seed = seed

    def add(self, key: str, d_in: int, d_out: int, device: Any = "cpu") -> None:

        with untouched_rng(device):
            m = torch.nn.Linear(d_in, d_out, bias=False, device=device)
        normal_(m.weight, d_in**-0.5, generator(self.seed, f"distill.projection:{key}"))
        self.maps[key] = m

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.maps.parameters()

    def state_dict(self) -> dict[str, Any]:
        return {"maps": sorted(self.maps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # the maps are made from the schedule; their weights come back through load_tensors

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.maps.state_dict().items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self.maps.load_state_dict(tensors)


class TeacherView(Protocol):
    """What DistillTask reads of its teachers: the run's :class:`Teachers`, or the one fake teacher of a
    memory estimate (``estimate_teacher``)."""

    @property
    def active(self) -> ModelAdapter | None: ...

    @property
    def active_name(self) -> str: ...

    def refresh_from_ema(self, teacher: Any) -> None: ...


class DistillTask:
    """A task whose loss adds the knobs' distillation terms to the wrapped task's label loss."""

    def __init__(self, task: Any, teachers: TeacherView, projections: Projections | None = None) -> None:
        self.task, self.teachers = task, teachers
        self.projections = projections if projections is not None else Projections()
        self.weights = (1.0, 0.0, 1.0)  # label, distill, temperature (set by the knobs each step)
        self.hidden: tuple[list[tuple[str, str]], float] = ([], 0.0)  # pairs, weight

    def make_batch(self, x: torch.Tensor, y: torch.Tensor, *, training: bool = True) -> Batch:
        return self.task.make_batch(x, y, training=training)

    def doc_lengths(self, batch: Batch) -> list[list[int]] | None:
        return self.task.doc_lengths(batch)

    def loss(self, adapter: Any, batch: Any, *, reduction: str = "mean") -> torch.Tensor:
        label_w, distill_w, tau = self.weights
        pairs, hidden_w = self.hidden
        teacher = self.teachers.active
        if teacher is None or (distill_w == 0 and hidden_w == 0) or reduction == "none" or not torch.is_grad_enabled():
            loss = self.task.loss(adapter, batch, reduction=reduction)
            return loss * label_w if reduction != "none" and torch.is_grad_enabled() else loss

        s_states: dict[str, torch.Tensor] = {}
        t_states: dict[str, torch.Tensor] = {}
        hooks = _capture(adapter, {s for s, _ in pairs}, s_states) if hidden_w else []
        try:
            out = adapter.forward(batch)
        finally:
            for h in hooks:
                h.remove()
        if self.teachers.active_name == "ema":  # the average as it is now (the model may have grown)
            self.teachers.refresh_from_ema(teacher)
        hooks = _capture(teacher, {t for _, t in pairs}, t_states) if hidden_w else []
        try:
            with torch.no_grad():
                t_out = teacher.forward(batch)
        finally:
            for h in hooks:
                h.remove()
        s_states["final"], t_states["final"] = out.hidden, t_out.hidden
        targets = batch.targets

        def shard_loss(logits: torch.Tensor, sl: slice) -> torch.Tensor:
            with torch.no_grad():
                t_logits = t_out.head(t_out.hidden[:, sl]).float()
            s = logits.float()
            ce = F.cross_entropy(s.flatten(0, 1), targets[:, sl].flatten(), reduction="sum")
            kl = F.kl_div(
                F.log_softmax(s / tau, -1), F.log_softmax(t_logits / tau, -1), log_target=True, reduction="sum"
            )
            return label_w * ce + distill_w * tau * tau * kl

        if out.loss_shards > 1:
            total = tiled_head_loss(out.hidden, out.head, shard_loss, out.loss_shards)
        else:
            total = shard_loss(out.head(out.hidden), slice(None))
        total = total / targets.numel() if reduction == "mean" else total
        if hidden_w:
            mse: float | torch.Tensor = 0.0
            for s, t in pairs:
                h_s, h_t = s_states[s].float(), t_states[t].float()
                key = f"{self.teachers.active_name}|{s}:{t}".replace(".", "_")
                if h_s.shape[-1] != h_t.shape[-1]:
                    h_s = self.projections.maps[key](h_s)
                mse = mse + F.mse_loss(h_s, h_t, reduction="mean")
            scale = 1.0 if reduction == "mean" else targets.numel()
            total = total + hidden_w * scale * mse / len(pairs)
        return total


def attach_teachers(run: RunSetup) -> None:
    """For a schedule with teachers: check run:/hf: teachers' tokenizers, add the Teachers part (and the
    learned projections, in the optimizer from step 1) to the run's parts, and wrap the task with the
    distillation terms; other schedules are left as they are."""
    cfg, ctx, schedule = run.cfg, run.ctx, run.schedule
    if not uses_teacher(cfg.schedule):
        return
    specs = {st.knobs.get("teacher") for st in cfg.schedule.stages} - {None}
    outside = [s for s in specs if s.partition(":")[0] in ("run", "hf")]
    if outside and run.data.train_ds is not None:  # run:/hf: teachers must tokenize as this run does
        own = load_prepared_tokenizer(run.data.train_ds.folder)
        for spec in outside:
            check_tokenizer(spec, cfg, own)
    teachers = run.parts["teachers"] = Teachers(cfg, schedule, ctx.precision, ctx.device)
    teachers.ema = run.parts.get("ema")
    teachers.fresh = getattr(ctx.model, "fresh", None)
    projections = Projections(cfg.train.seed)
    build_projections(cfg, schedule, ctx.model, projections, ctx.device)
    if len(projections.maps):  # learned with the model: in the optimizer from the first step
        run.parts["projections"] = projections
        assert ctx.optimizer is not None  # the trainer builds the optimizer before the families' setup
        ctx.optimizer.add_param_group(
            {
                "name": "distill_projections",
                "params": list(projections.parameters()),
                "weight_decay": 0.0,
                "lr_mult": 1.0,
            }
        )
    run.task = DistillTask(run.task, teachers, projections)


class DistillFamily(Family):
    """Teachers (snapshots of earlier stages, the EMA, other runs, HF folders) and the distillation task."""

    name = "distill"

    def setup(self, run: RunSetup) -> None:
        attach_teachers(run)


def _apply_weights(ctx: Any, value: Any) -> None:
    task = unwrap(ctx.task, DistillTask)
    if task is not None:
        k = ctx.knobs
        task.weights = (
            float(k.get("label_weight", 1.0)),
            float(k.get("distill_weight", 0.0)),
            float(k.get("distill_temperature", 1.0)),
        )
        task.hidden = (parse_pairs(k.get("distill_hidden", "none")), float(k.get("distill_hidden_weight", 0.0)))


def _width(adapter: Any) -> int:
    return int(adapter.head.weight.shape[1])


def build_projections(cfg: Any, schedule: Any, adapter: Any, projections: Projections, device: Any = "cpu") -> None:
    """Every projection the schedule's hidden-state losses need, made before training (so the optimizer's
    layout never changes); a teacher or student block that does not exist is an error here."""
    for st in schedule.stages:
        knobs = st.knobs_at(st.start)
        pairs = parse_pairs(knobs.get("distill_hidden", "none"))
        spec = knobs.get("teacher", "none")
        if not pairs:
            continue
        if spec == "none":
            raise ConfigError(f"stage '{st.name}' sets distill_hidden but has no teacher; set teacher")
        teacher = teacher_adapter(cfg, spec)
        names = f"stage:{schedule.stages[st.index - 1].name}" if spec == "previous_stage" else spec
        for s, t in pairs:
            _check_layer("student", s, len(adapter.blocks()), "the model")
            _check_layer("teacher", t, len(teacher.blocks()), f"teacher '{spec}'")
            if _width(adapter) != _width(teacher):
                key = f"{names}|{s}:{t}".replace(".", "_")
                if key not in projections.maps:
                    projections.add(key, _width(adapter), _width(teacher), device)


def estimate_teacher(
    cfg: Any, knobs: dict[str, Any], adapter: Any, task: Any, precision: str, seq_len: int
) -> tuple[DistillTask, list[torch.Tensor], int] | None:
    """rampup.knobs.memory's step hook: the distillation task around ``task`` with a fake teacher, the teacher's
    tensors and weight bytes, when the knobs teach (None otherwise)."""

    spec = knobs.get("teacher", "none")
    pairs = parse_pairs(knobs.get("distill_hidden", "none"))
    weights = (
        float(knobs.get("label_weight", 1.0)),
        float(knobs.get("distill_weight", 0.0)),
        float(knobs.get("distill_temperature", 1.0)),
    )
    hidden_w = float(knobs.get("distill_hidden_weight", 0.0)) if pairs else 0.0
    if spec in (None, "none") or (weights[1] == 0 and hidden_w == 0):
        return None
    kind, _, arg = spec.partition(":")
    if kind == "run":
        teacher = _fake_adapter(read_run(arg, "a teacher").model)
    elif kind == "hf":
        teacher = HFCausalLMAdapter.from_folder_config(arg, "cpu")
    else:  # a snapshot or the EMA of the run's own model, at its present shape
        teacher = _fake_adapter(adapter.module.cfg if hasattr(adapter.module, "tok_emb") else cfg.model)

    KnobRunner(KnobContext(teacher, cfg=cfg, precision=precision)).apply(
        {k: v for k, v in knobs.items() if k in MODEL_KNOBS}, seq_len
    )
    teacher.module.eval()
    for p in teacher.module.parameters():
        p.requires_grad_(False)

    class _One:  # the Teachers part's view the task reads
        active, active_name = teacher, spec

        def refresh_from_ema(self, teacher: Any) -> None:
            """Nothing to copy: the stand-in is built at the model's current shape and no EMA weights exist
            here; the trace only needs the teacher's forward (an EMA teacher's estimate crashed without it)."""

    projections = Projections()
    d_s, d_t = _width(adapter), _width(teacher)
    for s, t in pairs:
        if d_s != d_t:
            projections.add(f"{spec}|{s}:{t}".replace(".", "_"), d_s, d_t)
    distill = DistillTask(task, _One(), projections)
    distill.weights, distill.hidden = weights, (pairs, hidden_w)
    return (
        distill,
        [*teacher.module.parameters(), *teacher.module.buffers()],
        _storage_bytes(teacher.module.parameters()),
    )


register_knob(
    Knob(
        "teacher",
        "The stage's teacher: none | previous_stage | stage:NAME | run:PATH | hf:PATH.",
        default="none",
        rampable=False,
        check=check_teacher,
        apply=_apply_teacher,
        on_stage=_on_stage,
        check_config=lambda cfg: check_static(cfg, cfg.schedule),
    )
)
register_knob(
    Knob(
        "distill_hidden",
        "Hidden-state MSE to the teacher at block pairs 'STUDENT:TEACHER,...' "
        "(indices or final; a learned projection where widths differ).",
        default="none",
        rampable=False,
        check=_check_pairs,
        apply=_apply_weights,
    )
)
register_knob(
    Knob(
        "distill_hidden_weight",
        "Weight of the hidden-state MSE (may ramp).",
        default=0.0,
        minimum=0.0,
        apply=_apply_weights,
    )
)
register_knob(
    Knob(
        "distill_weight",
        "Weight of the distillation KL to the teacher (may ramp).",
        default=0.0,
        minimum=0.0,
        apply=_apply_weights,
    )
)
register_knob(
    Knob(
        "label_weight",
        "Weight of the label cross-entropy (may ramp; PS-KD: 1 - distill_weight).",
        default=1.0,
        minimum=0.0,
        apply=_apply_weights,
    )
)
register_knob(
    Knob(
        "distill_temperature",
        "Softmax temperature of the distillation KL.",
        default=1.0,
        minimum=1e-3,
        apply=_apply_weights,
    )
)

STEP_HOOKS.append(estimate_teacher)
register_family(DistillFamily())


def teacher_adapter(cfg: Any, spec: str) -> Any:
    """A weightless (meta) copy of a teacher's model, for its FLOPs and size."""
    kind, _, arg = spec.partition(":")
    if kind == "run":
        return build_adapter(read_run(arg, "a teacher").model, "meta")
    if kind == "hf":
        return HFCausalLMAdapter.from_folder_config(arg, "meta")
    return build_adapter(cfg.model, "meta")  # a snapshot of the run's own model
