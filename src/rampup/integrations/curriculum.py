"""A rampup schedule driven by another training loop: :class:`Curriculum` (the run's schedule, its data
and the knob effects on the host's model) and :class:`RampupDataset` (the schedule's batches as a
``torch.utils.data.IterableDataset`` with a resumable state).

Nothing here imports a host library; the bridges (rampup.integrations.transformers, .lightning) do.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from rampup.config import RunConfig, load_config
from rampup.engine.rundata import RunData, prepare_run
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError
from rampup.models.hf import HFCausalLMAdapter
from rampup.models.rope import RopeSpec
from rampup.protocols import ModelAdapter
from rampup.schedule.ramps import Ramp
from rampup.schedule.registry import KNOBS, KnobContext, KnobRunner, check_supported, knob_keys_set
from rampup.schedule.stages import Schedule, ScheduleConfig, StepPlan
from rampup.tools.plan import make_plan
from rampup.units import Duration

__all__ = ["HOST_REFUSED", "Curriculum", "RampupDataset", "load_schedule"]

HOST_REFUSED: dict[str, str] = {
    "depth": "growth restructures the model, and the host loop's optimizer and wrappers hold the old parameters",
    "width": "growth restructures the model, and the host loop's optimizer and wrappers hold the old parameters",
    "mlp_width": "growth restructures the model, and the host loop's optimizer and wrappers hold the old parameters",
    "growth": "growth restructures the model, and the host loop's optimizer and wrappers hold the old parameters",
    "growth_noise": "growth restructures the model, and the host loop's optimizer and wrappers hold the old parameters",
    "teacher": "distillation wraps rampup's own loss; the host loop computes its loss itself",
    "distill_weight": "distillation wraps rampup's own loss; the host loop computes its loss itself",
    "distill_hidden": "distillation wraps rampup's own loss; the host loop computes its loss itself",
    "distill_hidden_weight": "distillation wraps rampup's own loss; the host loop computes its loss itself",
    "distill_temperature": "distillation wraps rampup's own loss; the host loop computes its loss itself",
    "label_weight": "distillation wraps rampup's own loss; the host loop computes its loss itself",
    "subnet": "sub-network sampling wraps rampup's own loss; the host loop computes its loss itself",
    "loss_shards": "the tiled loss is rampup's own loss; the host loop computes its loss itself",
    "mlp_shards": "tiling is applied by rampup's engine around its own forward",
    "activation_offload": "activation offload is applied by rampup's engine around its own backward",
    "passkey_fraction": "passkey examples are inserted by rampup's engine with its evaluation data",
}
"""Knobs a host loop cannot apply, and why (refused when the curriculum is bound to a host)."""


def _schedule_config(source: str | Path | Mapping[str, Any]) -> tuple[ScheduleConfig, Duration | None]:
    """A file is a run config, or a bare ``schedule`` section (a mapping with ``stages`` at its top)."""
    if not isinstance(source, Mapping) and Path(source).is_file():
        tree = yaml.safe_load(Path(source).read_text())
        if isinstance(tree, Mapping) and "stages" in tree and "schedule" not in tree:
            source = tree
    if isinstance(source, Mapping):
        tree = dict(source)
        knobs = dict(tree.get("knobs") or {})
        sets_shape = any(k in knobs for k in ("seq_len", "batch_tokens")) or any(
            isinstance(st, Mapping) and ("seq_len" in st or "batch_tokens" in st) for st in tree.get("stages") or []
        )
        if not sets_shape:  # a schedule that shapes no batches (a scalar curriculum): progress counts steps
            tree["knobs"] = {"seq_len": 1, "batch_tokens": 1, **knobs}
        return ScheduleConfig.model_validate(tree), None
    run = load_config(source)
    return run.schedule, run.train.duration


def load_schedule(
    source: str | Path | Mapping[str, Any],
    *,
    duration: str | Duration | None = None,
    tokens_per_epoch: int | None = None,
) -> Schedule:
    """A schedule resolved on its axis of tokens, from a run config file (its ``schedule`` section and
    ``train.duration``), a file holding only a ``schedule`` section, or that section built in Python.

    ``duration`` (``"20M tok"``, ``"400 steps"``) overrides the file's ``train.duration`` and is needed with a
    bare schedule section; ``tokens_per_epoch`` resolves durations given in epochs. A section that sets neither
    ``seq_len`` nor ``batch_tokens`` shapes no batches (a scalar curriculum, such as a completion budget):
    its progress counts optimizer steps. ``schedule.at(tokens)`` then gives every knob's value and
    ``schedule.steps()`` every optimizer step (:class:`~rampup.schedule.stages.StepPlan`).
    """
    cfg, total = _schedule_config(source)
    if duration is not None:
        total = Duration.parse(duration) if isinstance(duration, str) else duration
    return Schedule.build(
        cfg, total=total, tokens_per_epoch=tokens_per_epoch, shape=CausalLM.step_shape(cfg.seq_len_mode)
    )


class Curriculum:
    """One run config's schedule and data, for a training loop that is not rampup's.

    Build it from the same YAML ``rampup train`` takes (``Curriculum.from_yaml``): the data section is
    prepared (tokenized once, cached) and checked, and the schedule resolved, before any compute. The
    host loop then takes the batches from :meth:`dataset` and, at each optimizer step, calls
    :meth:`apply` to set the step's knobs on its model and optimizer.
    """

    def __init__(
        self,
        schedule: Schedule,
        schedule_cfg: ScheduleConfig,
        *,
        cfg: RunConfig | None = None,
        data: RunData | None = None,
    ):
        self.schedule, self.schedule_cfg, self.cfg, self.data = schedule, schedule_cfg, cfg, data
        self.plans: list[StepPlan] = list(schedule.steps())
        self.task = (
            CausalLM(data.eot_id, doc_mask=cfg.data.doc_mask, restart_positions=cfg.data.restart_positions)
            if cfg is not None and data is not None
            else CausalLM()
        )
        self.runner: KnobRunner | None = None
        self._dataset: RampupDataset | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> Curriculum:
        """From a run config file, as ``rampup train`` takes it (``overrides``: ``--set`` style
        ``key=value`` strings): its data is prepared (tokenized once, cached) and checked here."""
        cfg = load_config(path, overrides)
        if cfg.images is not None:
            raise ConfigError(f"{path} is an image run (images:); a host-loop curriculum is for language models")
        data = prepare_run(cfg)
        return cls(data.schedule, cfg.schedule, cfg=cfg, data=data)

    @classmethod
    def from_schedule(
        cls, source: str | Path | Mapping[str, Any], *, duration: str | Duration | None = None
    ) -> Curriculum:
        """A curriculum without data of rampup's (the host loop keeps its own): a scalar schedule such as a
        completion budget. ``source`` and ``duration`` as in :func:`load_schedule`."""
        schedule_cfg, _ = _schedule_config(source)
        return cls(load_schedule(source, duration=duration), schedule_cfg)

    @property
    def num_steps(self) -> int:
        """Optimizer steps in the run (the host loop's ``max_steps``)."""
        return len(self.plans)

    def plan(self) -> Any:
        """What ``rampup plan`` shows for this config (:func:`rampup.tools.plan.make_plan`)."""
        if self.cfg is None or self.data is None:
            raise ConfigError("plan needs a run config (Curriculum.from_yaml); this curriculum has a schedule only")
        return make_plan(self.cfg, self.schedule, self.data.step_shapes)

    def dataset(self) -> RampupDataset:
        """The schedule's batches (one object per curriculum: the host loop and the callback share it)."""
        if self.data is None:
            raise ConfigError(
                "this curriculum has no data section (Curriculum.from_schedule); build it with "
                "Curriculum.from_yaml from a run config whose data section names the corpus"
            )
        if self._dataset is None:
            self._dataset = RampupDataset(self)
        return self._dataset

    # ------------------------------------------------------------------ checks against a host
    def set_knobs(self) -> set[str]:
        """Knobs the schedule sets away from their defaults anywhere."""
        sc = self.schedule_cfg
        return {
            name
            for name in knob_keys_set(sc)
            if any(
                v is not None and v != KNOBS[name].default
                for v in [sc.knobs.get(name)] + [st.knobs.get(name) for st in sc.stages]
            )
        }

    def check_host(self, host: str, applied_elsewhere: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Refuse, with the reason, a knob ``host`` cannot apply (``applied_elsewhere``: knobs the caller
        writes itself, such as a scalar bound to a trainer attribute)."""
        for name in sorted(self.set_knobs() - set(applied_elsewhere)):
            reason = HOST_REFUSED.get(name)
            if reason is None and KNOBS[name].model_free and name not in ("mix",):
                reason = "it belongs to rampup's image runs or is read only by rampup's engine"
            if reason is not None:
                raise ConfigError(
                    f"the schedule sets knob '{name}', which {host} cannot apply: {reason}; remove it from the "
                    "schedule, or train with `rampup train`"
                )

    # ------------------------------------------------------------------ the host's model
    def bind(
        self,
        model: nn.Module | Any,
        optimizer: torch.optim.Optimizer | None,
        applied_elsewhere: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> KnobRunner:
        """Attach the knob effects to the host's model (a Hugging Face causal LM, or a rampup adapter)
        and optimizer; the model is checked against every stage's knobs (positions, RoPE) here.
        ``applied_elsewhere``: knobs the caller writes itself (not the model's to honour)."""
        adapter = cast(ModelAdapter, model) if hasattr(model, "supports") else _hf_adapter(model)
        self._fit_positions(adapter)
        check_supported(adapter, _without(self.schedule_cfg, set(applied_elsewhere)))
        sampler = self.data.sampler if self.data is not None else None
        seed = self.cfg.train.seed if self.cfg is not None else 0
        ctx = KnobContext(adapter, optimizer, sampler, self.data, seed=seed, cfg=self.cfg)
        ctx.task = self.task
        self.runner = KnobRunner(ctx)
        return self.runner

    def _fit_positions(self, adapter: Any) -> None:
        """A model whose position limit a stage passes is extended where that stage's RoPE covers it."""
        if not hasattr(adapter, "extend_positions"):
            return
        cfg = adapter.module.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit is None:
            return
        for st in self.schedule.stages:
            seq = st.settings.get("seq_len")
            top = max(seq.start, seq.to) if isinstance(seq, Ramp) else seq
            rope: RopeSpec = st.settings.get("rope") or RopeSpec()
            if top is not None and top > limit:
                if rope.method == "base":
                    raise ConfigError(
                        f"stage '{st.name}' trains at seq_len {top}, beyond the model's position limit "
                        f"(max_position_embeddings {limit}); give that stage a rope (pi, ntk or yarn with "
                        f"original_max_len: {limit}) or keep seq_len <= {limit}"
                    )
                adapter.extend_positions(int(top))

    def apply(self, step: int, length: int | None = None) -> dict[str, Any]:
        """Set step ``step``'s knobs (0-based) on the bound model and optimizer; returns the knobs.
        ``length``: the sequence length of the step's batch (the planned one when None)."""
        if self.runner is None:
            raise ConfigError("Curriculum.apply before bind(model, optimizer): bind the host's model first")
        sp = self.plans[min(step, len(self.plans) - 1)]
        n = int(length if length is not None else sp.seq_len)
        stage = self.schedule.stages[sp.stage]
        ctx = self.runner.ctx
        ctx.step, ctx.tokens, ctx.rows = step, sp.tokens_before, sp.batch_size
        if stage.index > 0 and step > 0 and self.plans[step - 1].stage != sp.stage:
            self.runner.stage_start(sp.knobs, self.schedule.at(stage.start - 1))
        self.runner.apply(sp.knobs, n)
        return sp.knobs

    def lr_factor(self, group: Mapping[str, Any] | None = None) -> float:
        """What the step multiplies into an optimizer group's learning rate: ``lr_mult`` times the
        group's own ``lr_mult`` (set per parameter by ``lr_groups`` / ``lr_layer_decay``)."""
        if self.runner is None:
            return 1.0
        own = 1.0 if group is None else float(group.get("lr_mult", 1.0))
        return self.runner.ctx.lr_mult * own

    def stage_of(self, step: int) -> tuple[int, str]:
        st = self.schedule.stages[self.plans[min(step, len(self.plans) - 1)].stage]
        return st.index, st.name

    def log_values(self, step: int) -> dict[str, float]:
        """The step's scalar knob values and stage, as a host logger takes them (``rampup/<knob>``)."""
        sp = self.plans[min(step, len(self.plans) - 1)]
        shown = self.set_knobs() | {"lr_mult"}
        if self.data is None:  # a scalar curriculum: its batch shape is a placeholder, its progress steps
            shown -= {"seq_len", "batch_tokens"}
        out = {
            f"rampup/{k}": float(v)
            for k, v in sp.knobs.items()
            if k in shown and isinstance(v, int | float) and not isinstance(v, bool)
        }
        out["rampup/stage"] = float(sp.stage)
        if self.data is not None:
            out["rampup/tokens"] = float(sp.tokens_before + sp.tokens)
        return out


def _without(cfg: ScheduleConfig, names: set[str]) -> ScheduleConfig:
    """``cfg`` without the knobs ``names`` (in its starting values and every stage)."""
    if not names:
        return cfg
    stages = [
        st.model_copy(update={"knobs": {k: v for k, v in st.knobs.items() if k not in names}}) for st in cfg.stages
    ]
    return cfg.model_copy(update={"knobs": {k: v for k, v in cfg.knobs.items() if k not in names}, "stages": stages})


def _hf_adapter(model: nn.Module) -> Any:
    return HFCausalLMAdapter(model)


def check_loop(
    cur: Curriculum, host: str, *, max_steps: int, fix: str, accumulation: tuple[str, int], world_size: int
) -> None:
    """The settings every host loop shares, checked before its first step: ``max_steps`` equal to the
    schedule's steps (``fix``: the setting that gives it, with ``{n}``), and for a curriculum that serves
    the batches no gradient accumulation (``accumulation``: the host's name and value) and one process."""
    n = cur.num_steps
    if max_steps != n:
        which = "shorter than" if 0 <= max_steps < n else "longer than"
        raise ConfigError(
            f"{host}'s max_steps ({max_steps}) is {which} the schedule's {n} optimizer steps; set "
            f"{fix.format(n=n)} (Curriculum.num_steps)"
        )
    if cur.data is None:  # a scalar schedule (a completion budget): the host's own batches
        return
    name, value = accumulation
    if value != 1:
        raise ConfigError(
            f"{name} is {value}; a RampupDataset item is a whole optimizer step already (its token budget is "
            "the schedule's batch_tokens): set it to 1"
        )
    if world_size > 1:
        raise ConfigError(
            f"RampupDataset in {host} of {world_size} processes is not supported yet (each process would serve "
            "the whole batch); train on one process, or with `rampup train --nproc`"
        )


class RampupDataset(IterableDataset):
    """The curriculum's batches, one whole constant-token batch per item, in the order of its steps.

    Each item is a dict of tensors: ``input_ids`` (B, T), ``labels`` and ``shift_labels`` (the next
    tokens, already shifted: a Hugging Face causal LM scores ``shift_labels`` as they are), and with
    ``data.doc_mask`` an ``attention_mask`` (B, 1, T, T) that keeps attention inside each document (and
    ``position_ids`` restarting per document with ``data.restart_positions``). Use it with a batch size of
    one and :meth:`collate`, which unwraps the item.

    The state (``state_dict`` / ``load_state_dict``) is the sampler's before a given step: a loader
    that reads ahead has already drawn later batches when a checkpoint is written, so
    ``state_dict(consumed)`` returns the state before step ``consumed`` (the steps the host trained).
    """

    KEEP = 64
    """Read-ahead the state covers (a loader that prefetches more than this many batches is refused at resume)."""

    def __init__(self, curriculum: Curriculum):
        self.curriculum = curriculum
        assert curriculum.data is not None  # Curriculum.dataset refuses a curriculum without data
        self.sampler = curriculum.data.sampler
        self.next_step = 0
        self._before: OrderedDict[int, dict] = OrderedDict()
        self.lengths: dict[int, int] = {}
        """Sequence length of each step's batch, as served (the buckets sampler picks it per step)."""

    def __len__(self) -> int:
        return len(self.curriculum.plans)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plans = self.curriculum.plans
        while self.next_step < len(plans):
            step = self.next_step
            self._remember(step)
            x, y = self.sampler.take(plans[step])
            self.next_step += 1
            self.lengths[step] = int(x.shape[1])
            self.lengths.pop(step - self.KEEP, None)
            yield self.item(x, y)

    def _remember(self, step: int) -> None:
        self._before[step] = copy.deepcopy(self.sampler.state_dict())
        while len(self._before) > self.KEEP:
            self._before.popitem(last=False)

    def item(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step's (x, y) as a causal LM's keyword arguments."""
        batch = self.curriculum.task.make_batch(x, y)
        out = {"input_ids": x, "labels": y, "shift_labels": y}
        spans = batch.extra.get("spans")
        if spans is not None:
            seg = spans.segment_ids(x.device)
            same = seg[:, :, None] == seg[:, None, :]
            T = x.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            out["attention_mask"] = (same & causal)[:, None]
        if "positions" in batch.extra:
            out["position_ids"] = batch.extra["positions"]
        return out

    def loader(self) -> DataLoader:
        """A ``DataLoader`` that serves the items as they are (no batching, no workers): what a loop
        that takes a loader (Lightning's ``trainer.fit(module, train_dataloaders=...)``) is given."""
        return DataLoader(self, batch_size=None, num_workers=0)

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A loader's list of one item -> that item (the batch is already whole)."""
        if len(items) != 1:
            raise ConfigError(
                f"RampupDataset serves whole batches; the loader grouped {len(items)} of them. Use a batch "
                "size of 1 (per_device_train_batch_size=1 in a Hugging Face Trainer)"
            )
        return items[0]

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The state before step ``consumed`` (default: before the next step this dataset would serve)."""
        step = self.next_step if consumed is None else int(consumed)
        if step == self.next_step:
            sampler = copy.deepcopy(self.sampler.state_dict())
        elif step in self._before:
            sampler = self._before[step]
        else:
            raise ConfigError(
                f"RampupDataset has no state for step {step} (served up to {self.next_step}, read-ahead kept: "
                f"{self.KEEP}); the loader read further ahead than rampup keeps, lower its prefetch"
            )
        return {"step": step, "sampler": sampler, "num_steps": len(self.curriculum.plans)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_steps"]) != len(self.curriculum.plans):
            raise ConfigError(
                f"the saved curriculum state is for a run of {state['num_steps']} steps, this schedule has "
                f"{len(self.curriculum.plans)}; resume with the config the run was started with"
            )
        self.sampler.load_state_dict(copy.deepcopy(dict(state["sampler"])))
        self.next_step = int(state["step"])
        self._before.clear()
