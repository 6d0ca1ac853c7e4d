"""The engine: a :class:`Trainer` whose loop reads in one screen (:meth:`Trainer.fit`).

Everything it runs plugs in through a seam: the model through a ModelAdapter
(rampup.models.adapter), the batch and loss through a Task (rampup.engine.tasks), the data through RunData
(rampup.engine.trainer), knob effects through the knob registry (rampup.schedule.registry: the loop applies
whatever changed without knowing any knob's name), checkpoints through a Checkpointer
(rampup.engine.checkpoint.local), metrics mirrors through Loggers (rampup.engine.loggers). Stage
changes, evaluation, checkpointing and rollback are named methods.

Guarantees kept from the single-function engine: a run stopped at any step resumes bitwise on CPU;
a non-finite step is skipped, a streak rolls back to the newest intact checkpoint at a lower lr (or
stops); the first SIGTERM/SIGINT checkpoints and exits 128+N, a second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from rampup.engine.checkpoint.format import Checkpoint
from rampup.engine.checkpoint.local import LocalCheckpointer
from rampup.engine.distributed import device_for, setup
from rampup.engine.evaluation import evaluate_lengths, evaluate_parts, passkey_accuracy
from rampup.engine.faults import NanInjector, StallInjector, clock_scale
from rampup.engine.initfrom import load_weights
from rampup.engine.loggers import build_loggers
from rampup.engine.optim import build_optimizer, lr_at
from rampup.engine.precision import (
    bf16_slow_warning,
    matmul_roof,
    resolve_precision,
    saved_precision,
)
from rampup.engine.records import (
    Display,
    MetricsWriter,
    NullMetrics,
    Records,
    StepResult,
    write_record_file,
)
from rampup.engine.rundata import (
    RunData,
    RunInputs,
    check_graphs,
    micro_shapes,
    prepare_run,
)
from rampup.engine.runlock import RunLock
from rampup.engine.state import KEPT_ON_ROLLBACK, Progress, TrainState
from rampup.engine.step import (
    REGIONS,
    Interrupted,
    evaluate,
    optimizer_step,
    resolve_device,
    train_step,
)
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError, NonFiniteError
from rampup.models.build import build_adapter
from rampup.protocols import Batch, ModelAdapter, RunSettings, Task
from rampup.schedule.registry import (
    KNOBS,
    KnobContext,
    KnobRunner,
    RunSetup,
    check_supported,
    families,
    graph_id,
    parameter_groups,
)
from rampup.schedule.stages import StepPlan
from rampup.units import Duration, Unit

__all__ = [
    "Interrupted",
    "Progress",
    "RunData",
    "RunInputs",
    "Trainer",
    "check_graphs",
    "micro_shapes",
    "evaluate",
    "optimizer_step",
    "prepare_run",
    "resolve_device",
    "train",
    "train_step",
]
"""The engine's public functions, for a loop of your own or a whole run."""


class TrainerSettings(RunSettings, Protocol):
    """The run config as the trainer reads it: rampup.config.RunConfig, a layer above the engine."""

    def model_dump(self, *, mode: str = ..., by_alias: bool | None = ...) -> dict[str, Any]: ...

    def resolved_out_dir(self) -> Path: ...


_FAULT_EVENTS = ("skip", "rollback")
_COMPARED_ON_RESUME = ("model", "data", "schedule", "optimizer")


def _every(d: Duration | None, total_tokens: int) -> Callable[[int, int, int], bool]:
    """A predicate (step, tokens_before, tokens_after) -> bool firing every ``d``."""
    if d is None:
        return lambda step, before, after: False
    if d.unit is Unit.STEP:
        n = int(d.value)
        return lambda step, before, after: step % n == 0
    n = max(1, d.to_tokens(total_tokens=total_tokens))
    return lambda step, before, after: after // n > before // n


class _SignalFlag:
    """First SIGTERM/SIGINT asks for a checkpoint and a clean stop; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of a nested dict (lists by index)."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in items:
        out |= _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    return out or {prefix: tree}


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (a key one side lacks shows as missing; a key
    added since the checkpoint was written, at its unset value None, is no change)."""
    a, b = _leaves(saved), _leaves(now)
    return [
        f"{k}: {a.get(k, '(missing)')} -> {b.get(k, '(missing)')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def check_resumable(saved: dict[str, Any], cfg: TrainerSettings) -> None:
    now = cfg.model_dump(mode="json", by_alias=True)
    compared = {k: saved.get(k) for k in _COMPARED_ON_RESUME}, {k: now.get(k) for k in _COMPARED_ON_RESUME}
    train = ("duration", "seed", "precision", "micro_batch_tokens", "ema")
    changes = config_changes(
        compared[0] | {"train": {k: saved.get("train", {}).get(k) for k in train}},
        compared[1] | {"train": {k: now["train"].get(k) for k in train}},
    )
    if changes:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ConfigError(
            f"the config differs from the checkpoint's: {shown}. Resume with the config the run "
            "started with (saved as config.yaml in the run folder)"
        )


class Trainer:
    """One run: built (and checked) in ``__init__``, trained by :meth:`run`."""

    def __init__(
        self,
        cfg: TrainerSettings,
        *,
        resume: bool = False,
        display_mode: str | None = None,
        build_model: Callable[[TrainerSettings, torch.device], ModelAdapter] | None = None,
        task: Task | None = None,
        data: RunData | None = None,
    ) -> None:
        self.cfg, self.resume = cfg, resume
        self.dist = setup(cfg)  # one process, or this rank of the job torchrun started
        # rank 0 prepares (tokenizes, caches) the corpus before the others read it
        self.data = data if data is not None else self.dist.main_first(lambda: prepare_run(cfg))
        self.dist.check_rows(sorted(self.data.shapes))
        self.schedule = self.data.schedule
        self.out = out = cfg.resolved_out_dir()
        # one process per run folder, taken before anything is read from or written to it (rank 0: the job's)
        self.lock = RunLock(out).acquire() if self.dist.main else None
        try:
            self._build(cfg, display_mode, build_model, task)
        except BaseException:  # a refused run lets go of its folder at once (in-process callers retry)
            if self.lock is not None:
                self.lock.release(undo=True)
            raise

    def _build(
        self,
        cfg: TrainerSettings,
        display_mode: str | None,
        build_model: Callable[[TrainerSettings, torch.device], ModelAdapter] | None,
        task: Task | None,
    ) -> None:
        out, resume = self.out, self.resume
        self.checkpointer = LocalCheckpointer(out / "checkpoints", keep=cfg.train.keep_checkpoints)
        found = self.checkpointer.latest()
        if found is not None and not resume:
            raise ConfigError(
                f"{out} already holds a checkpoint ({found.name}); pass --resume to continue it, "
                "or choose another name / train.out_dir for a new run"
            )
        if resume and found is None:
            raise ConfigError(f"--resume: no checkpoint in {self.checkpointer.folder}; run without --resume to start")
        self.nan_faults, self.stall_faults = NanInjector.from_env(), StallInjector.from_env()
        self.clock_scale = clock_scale(cfg.name)
        self.policy = cfg.train.nonfinite
        self.build_model(build_model, task)
        self.start_lines = self.setup_families()
        config_dump = cfg.model_dump(mode="json", by_alias=True)
        self.metrics, self.display = self.open_record(config_dump, display_mode)
        self.records = Records(self.metrics, self.display)
        self.should_eval = _every(cfg.eval.every, self.schedule.total_tokens)
        self.should_save = _every(cfg.train.checkpoint_every, self.schedule.total_tokens)
        self.extra_state = {"config": config_dump}
        self.resume_hint = f"rampup train {out / 'config.yaml'} --resume"
        self.stage_index, self.data_epoch = -1, self.data.sampler.epoch  # what the loop last announced
        self.seen_graphs: set[tuple] = set()
        self.roof = 0.0
        """GFLOP/s of a large matmul at the run's precision here (measured in :meth:`start`)."""
        self.flag = _SignalFlag()
        self.damage: list[str] = []
        """Damaged checkpoints met by the last load, not yet in the record."""

    def build_model(
        self, build_model: Callable[[TrainerSettings, torch.device], ModelAdapter] | None, task: Task | None
    ) -> None:
        """The model on its device (seeded; initial weights loaded; sharded), its optimizer, the task, the state."""
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = device_for(self.dist, resolve_device(cfg.train.device))
        precision = resolve_precision(cfg.train.precision, self.device)  # a bf16 request CUDA cannot honour fails here
        torch.manual_seed(cfg.train.seed)
        adapter = (build_model or (lambda c, d: build_adapter(c.model, d)))(cfg, self.device)
        check_supported(adapter, cfg.schedule)
        if cfg.train.init_from is not None and not self.resume:  # a resume takes its own checkpoint's weights
            load_weights(adapter, cfg.train.init_from)
        self.dist.shard(adapter, self.device)  # FSDP2: before the optimizer, which then holds the shards
        optimizer = build_optimizer(adapter.module, cfg.optimizer, parameter_groups(cfg))
        self.checkpointer = self.dist.checkpointer(self.checkpointer, cfg)  # FSDP2: through an unsharded replica
        if cfg.train.compile:
            # One static graph per batch shape and graph-making knob value: they are few (checked in
            # prepare_run), and static graphs are the fastest; dynamo must be allowed to keep all of them.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.data.graphs) + 1)
            adapter.compile(backend=cfg.train.compile_backend, dynamic=False)
        self.task = (
            task
            if task is not None
            else CausalLM(self.data.eot_id, doc_mask=cfg.data.doc_mask, restart_positions=cfg.data.restart_positions)
        )
        self.state = TrainState(adapter, optimizer, self.data.sampler, precision)

    def setup_families(self) -> list[str]:
        """Every knob family's build-time hook (parts, a wrapped task), then its checks before any step
        (memory: what fits, what ``auto`` picks per shape); returns the lines the run prints at its start."""
        cfg, state = self.cfg, self.state
        ctx = KnobContext(
            state.model,
            state.optimizer,
            self.data.sampler,
            self.data,
            seed=cfg.train.seed,
            cfg=cfg,
            precision=state.precision.precision,
            device=self.device,
            parts=state.parts,
        )
        self.knobs = KnobRunner(ctx)
        run = RunSetup(cfg, self.schedule, self.data, ctx, state.parts, self.task, self.dist.world)
        for family in families():
            family.setup(run)
        self.task = ctx.task = run.task
        return [line for family in families() for line in family.check(run)]

    def open_record(
        self, config_dump: dict[str, Any], display_mode: str | None
    ) -> tuple[MetricsWriter | NullMetrics, Display]:
        """(metrics writer, display): rank 0 writes the one record (its loggers' packages checked now)."""
        cfg, out = self.cfg, self.out
        metrics: MetricsWriter | NullMetrics
        if self.dist.main:
            mirrors = build_loggers(cfg.log, out, cfg.name, config_dump)  # a missing package fails before training
            out.mkdir(parents=True, exist_ok=True)
            metrics = MetricsWriter(out / "metrics.jsonl", mirrors=mirrors)
        else:
            metrics, display_mode = NullMetrics(), "off"
        return metrics, Display(
            display_mode or cfg.log.progress,
            self.schedule.num_steps(),
            self.schedule.total_tokens,
            int(cfg.log.every.value),
        )

    @property
    def progress(self) -> Progress:
        return self.state.progress

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        try:
            try:
                self.start()
                if self.resume and self.progress.tokens >= self.schedule.total_tokens:
                    return self.finished_summary()  # nothing to resume: records and checkpoint stay as they are
                with self.flag, self.dist.named_failures():
                    final, path = self.fit()
            finally:
                self.display.close()
                self.metrics.close()
            summary = self.write_summary(final, path)
            self.dist.close()
            return summary
        finally:
            if self.lock is not None:
                self.lock.release()

    def finished_summary(self) -> dict[str, Any]:
        """The summary of a run that had already finished when --resume was asked (its summary.json, or
        one made from its last checkpoint), marked ``already_finished``."""
        self.dist.close()
        path = self.out / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
        else:
            p = self.progress
            summary = {
                "name": self.cfg.name,
                "steps": p.step,
                "tokens": p.tokens,
                "flops": p.flops,
                "train_time": p.train_time,
                "compile_time": p.compile_time,
                "val_loss": {},
                "skipped_steps": p.skipped_steps,
                "skipped_tokens": p.skipped_tokens,
                "rollbacks": p.rollbacks,
                "lr_scale": p.lr_scale,
                "checkpoint": str(self.checkpointer.latest()),
                "metrics": str(self.out / "metrics.jsonl"),
            }
        return summary | {"already_finished": True}

    def fit(self) -> tuple[dict[int, float], Path]:
        """Every step of the schedule, then the final evaluation and checkpoint (trained on again if
        that checkpoint found non-finite weights and rolled back)."""
        while True:
            while self.progress.tokens < self.schedule.total_tokens:
                if self.train_step().rolled_back:
                    continue  # the step after the restored checkpoint is next
                self.after_step()
            final = self.evaluate()
            path = self.save()
            if path is not None:
                return final, path

    def train_step(self) -> StepResult:
        """One optimizer step with its knobs applied and its record written: what happened."""
        p, cfg = self.progress, self.cfg
        sp = self.schedule.step_at(p.step, p.tokens)
        self.enter_stage(sp)
        t0 = time.perf_counter()
        batch = self.next_batch(sp)
        # the step's lr is the schedule's value at the end of the step, so warmup's first step is not ~0
        lr = (
            lr_at(cfg.optimizer, p.tokens + sp.tokens, self.schedule.total_tokens) * self.knobs.ctx.lr_mult * p.lr_scale
        )
        self.stall_faults.maybe_stall(p.step + 1)
        self.dist.heartbeat(p.step + 1)  # this rank is at the step's collectives
        every = cfg.train.profile_every
        profiler = _StepProfiler() if every and (p.step + 1) % every == 0 else contextlib.nullcontext()
        with profiler, self.nan_faults.poison(self.state.model.head, p.step + 1):
            loss, gnorm = optimizer_step(
                self.state.model,
                self.task,
                self.state.optimizer,
                batch,
                lr=lr,
                precision=self.state.precision.precision,
                micro_batch_items=cfg.train.micro_batch_tokens,
                grad_clip=cfg.optimizer.grad_clip,
                dist=self.dist,
            )
            if math.isfinite(loss) and math.isfinite(gnorm):  # applied steps only
                for family in families():
                    family.after_step(self.knobs.ctx, batch.items * self.dist.world)  # the global batch's tokens
        dt = (time.perf_counter() - t0) * self.clock_scale
        result = self.record_step(sp, batch, loss, gnorm, lr, dt)
        if isinstance(profiler, _StepProfiler):
            self.records.profile(
                self.progress, batch.rows * self.dist.world, batch.items // batch.rows, dt, profiler.seconds(dt)
            )
        return result

    def after_step(self) -> None:
        """Data epochs, evaluation, a pending signal and checkpoints, in that order."""
        p, before = self.progress, self._tokens_before
        if self.data.sampler.epoch != self.data_epoch:
            self.data_epoch = self.data.sampler.epoch
            self.records.data_epoch(p, self.data_epoch)
        done = p.tokens >= self.schedule.total_tokens
        if self.should_eval(p.step, before, p.tokens) and not done:
            self.evaluate()
        if self.dist.any(self.flag.signum is not None):  # a signal on any rank stops every rank here
            sent = self.dist.broadcast(self.flag.signum)  # every rank joins: rank 0 may have none
            self.flag.signum = self.flag.signum or sent or signal.SIGTERM
            path = self.save() or self.checkpointer.latest()
            raise Interrupted(
                f"by signal {self.flag.signum} ({signal.Signals(self.flag.signum).name}) after step "
                f"{p.step}; checkpoint "
                f"{path}. Resume with: {self.resume_hint}",
                128 + self.flag.signum,
            )
        if self.should_save(p.step, before, p.tokens) and not done:
            self.save()

    # ------------------------------------------------------------------ the parts of a step
    def enter_stage(self, sp: StepPlan) -> None:
        if sp.stage == self.stage_index:
            return
        self.stage_index = sp.stage
        stage, p = self.schedule.stages[sp.stage], self.progress
        self.records.stage(p, stage.index, stage.name, sp.knobs, {k: knob.default for k, knob in KNOBS.items()})

    def next_batch(self, sp: StepPlan) -> Batch:
        """The sampler's batch of this step, with the knobs' batch effects, on the device, and
        every knob whose value (or the batch's length) changed applied."""
        x, y = self.data.sampler.take(sp)
        raw = Batch(x, y, {})
        self.knobs.ctx.step = self.progress.step
        self.knobs.batch(sp.knobs, raw)  # on the CPU tensors, in place (a data mixture)
        # every rank draws the same global batch and trains on its own rows of it
        batch = self.task.make_batch(self.dist.shard_rows(raw.inputs), self.dist.shard_rows(raw.targets))
        self.knobs.ctx.rows, self.knobs.ctx.tokens = batch.rows, self.progress.tokens
        stage = self.schedule.stages[sp.stage]
        if stage.index > 0 and self.progress.tokens == stage.start:  # a stage's first step (also on a resume there)
            self.knobs.stage_start(sp.knobs, self.schedule.at(stage.start - 1))
        self.knobs.apply(sp.knobs, batch.items // batch.rows)
        self.dist.wrap(self.state.model)  # DDP over the trainable parameters, rebuilt when they change
        for family in families():
            for record in family.events(self.knobs.ctx):
                self.records.write(record)
        return batch.to(self.device)

    def record_step(self, sp: StepPlan, batch: Batch, loss: float, gnorm: float, lr: float, dt: float) -> StepResult:
        """The step counted into the progress and written to the record (a non-finite one as a skip,
        rolling back after too many in a row)."""
        p, cfg = self.progress, self.cfg
        B, n_items = batch.rows * self.dist.world, batch.items * self.dist.world  # the global batch
        T = n_items // B  # the sampler's shape: the buckets sampler picks T itself
        graphs = {graph_id(sp.knobs, s) for s in micro_shapes(batch.rows, T, cfg.train.micro_batch_tokens)}
        compiled = cfg.train.compile and not graphs <= self.seen_graphs
        self.seen_graphs |= graphs
        flops = self.state.model.flops_per_item(tuple(batch.inputs.shape), doc_lengths=self.task.doc_lengths(batch))
        self._tokens_before = p.tokens
        result = StepResult(
            p.step + 1,
            n_items,
            B,
            T,
            loss,
            gnorm,
            lr,
            dt,
            flops * n_items,
            compiled,
            math.isfinite(loss) and math.isfinite(gnorm),
        )
        p.count(result)
        if result.applied:
            stage = self.schedule.stages[sp.stage]
            eta = p.train_time / max(1, p.tokens) * max(0, self.schedule.total_tokens - p.tokens)
            self.records.step(p, result, stage.index, stage.name, self.roof * 1e9 * self.dist.world, eta)
            return result
        self.records.skip(p, result, self.policy.max_skips, self.policy.on_limit)
        if p.consecutive_skips >= self.policy.max_skips:
            self.rollback_or_stop(f"{p.consecutive_skips} steps in a row had a non-finite loss or gradient norm")
            return replace(result, rolled_back=True)
        return result

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[int, float]:
        """Held-out loss at every evaluation length with the run's current knobs (the one eval path)."""
        p, cfg = self.progress, self.cfg
        prec = self.state.precision.precision
        # the knobs of the last token trained: at a stage boundary the stage just ended, not the next one
        # (whose teacher, a snapshot of the stage ending, does not exist yet)
        knobs = self.schedule.at(max(0, min(p.tokens, self.schedule.total_tokens) - 1))
        trained = self.knobs.save()
        if trained is not None:  # a knob that restructures the model (growth) acts at its step, never in evaluation
            knobs = {k: trained[0][k] if KNOBS[k].restructures and k in trained[0] else v for k, v in knobs.items()}

        accuracy: dict[int, float] = {}  # a classifier's, filled before each(n, ...) runs

        def each(n: int, loss: float) -> None:
            if cfg.eval.passkey_samples:
                self._passkey(n, prec)
            self.records.eval_length(p, n, loss, accuracy=accuracy.get(n))

        with contextlib.ExitStack() as held:  # a family's weights swapped in (the EMA), for every length
            for family in families():
                held.enter_context(family.evaluating(self.knobs.ctx))
            if self.data.eval_parts:  # a set in named parts (a mixture's sources): each part recorded too
                losses, by_part = evaluate_parts(
                    self.state.model, self.task, self.knobs, knobs, self.data.eval_parts, precision=prec, each=each
                )
                for name, part in by_part.items():
                    for n, loss in part.items():
                        self.records.eval_length(p, n, loss, part=name)
            else:
                losses = evaluate_lengths(
                    self.state.model,
                    self.task,
                    self.knobs,
                    knobs,
                    self.data.eval_sets,
                    precision=prec,
                    each=each,
                    accuracy=accuracy,
                )
        self.records.evaluation(p, losses)
        return losses

    def _passkey(self, n: int, precision: str) -> None:
        template, p, cfg = self.data.passkey_template(), self.progress, self.cfg
        if n < template.min_len():
            return
        acc = passkey_accuracy(
            self.state.model,
            template,
            self.data.passkey_stream(),
            [n],
            cfg.eval.passkey_depths,
            cfg.eval.passkey_samples,
            seed=cfg.train.seed,
            precision=precision,
        )[n]
        self.records.passkey(p, n, acc)

    # ------------------------------------------------------------------ checkpoints, resume, rollback
    def start(self) -> None:
        removed = self.checkpointer.clean_partial() if self.dist.main else []
        self.dist.barrier()
        if removed:
            self.display.print(
                f"removed what a killed checkpoint write left in {self.checkpointer.folder}: {', '.join(removed)}"
            )
        if self.resume:
            ck = self.load_latest(check=lambda st: check_resumable(st["config"], self.cfg))
            if ck is None:  # the folder held one when the run was built: it was removed since
                raise ConfigError(
                    f"--resume: no checkpoint in {self.checkpointer.folder}; run without --resume to start"
                )
            self.restore(ck)
            self.metrics.truncate_after(self.progress.step)
            self.record_damage()
        # the matmul roof of this machine at the run's precision: achieved FLOP/s are read against it
        self.roof = matmul_roof(self.state.precision.precision, self.device)
        if not self.resume:
            if self.dist.main:
                write_record_file(
                    self.out / "config.yaml",
                    yaml.safe_dump(self.cfg.model_dump(mode="json", by_alias=True), sort_keys=False),
                )
            self.metrics.truncate_after(0)
            self.metrics.write(
                {
                    "event": "run",
                    "step": 0,
                    "name": self.cfg.name,
                    "device": str(self.device),
                    "precision": self.state.precision.as_dict(),
                    "world_size": self.dist.world,
                    "roof_gflops": self.roof,
                    **(
                        {"strategy": self.cfg.train.strategy, "backend": self.dist.backend} if self.dist.enabled else {}
                    ),
                }
            )
        s, prec = self.schedule, self.state.precision
        self.display.print(
            f"run '{self.cfg.name}': {self.display.total_steps} steps, {s.total_tokens:,} "
            f"{'images' if s.shape is not None and s.shape.unit == 'img' else 'tokens'}, "
            f"{self.state.model.num_params():,} non-embedding parameters, device {self.device}, "
            f"output {self.out}"
            + (f" (resumed at step {self.progress.step})" if self.resume else "")
            + (
                f"; {self.dist.world} processes ({self.cfg.train.strategy}, {self.dist.backend})"
                if self.dist.enabled
                else ""
            )
        )
        self.display.print(prec.line() + (" -- kept from the run's start, for a bitwise resume" if self.resume else ""))
        for line in self.start_lines:
            self.display.print(line)
        slow = bf16_slow_warning(prec, self.device, resumed=self.resume)
        for w in ([slow] if slow else []) + (self.data.warnings if self.dist.main else []):
            print(f"warning: {w}", file=sys.stderr, flush=True)
        self.state.model.module.train()

    def warn(self, message: str) -> None:
        """A damaged checkpoint set aside: said now, recorded once the record is cut back to the checkpoint
        used (:meth:`record_damage`), so that a write failure cannot come before the rewrite."""
        print(f"warning: {message}", file=sys.stderr, flush=True)
        self.damage.append(message)

    def record_damage(self) -> None:
        for message in self.damage:  # no step: the record stays through every later resume or rollback
            self.metrics.write({"event": "damaged_checkpoint", "message": message})
        self.damage = []

    def restore(self, ck: Checkpoint) -> None:
        """Take the checkpoint's progress, sampler, parts and precision; knobs are re-applied at the next step."""
        self.state.load_state_dict(ck.state, ck.part_tensors)
        self.state.precision = saved_precision(ck.state, self.device)
        p = self.progress
        self.stage_index = self.schedule.stage_at(p.tokens).index if p.step else -1
        self.data_epoch = self.data.sampler.epoch
        self.knobs.reset()

    def checkpoint(self) -> Path:
        return self.checkpointer.save(self.state, self.extra_state)

    def save(self) -> Path | None:
        """A checkpoint of this step (rank 0 writes it, every rank waits); None if the weights were not
        finite and the run rolled back."""
        path, error = None, None
        if self.dist.main or self.checkpointer.collective:  # FSDP2 gathers on every rank
            try:
                path = self.checkpoint()
            except NonFiniteError as e:
                error = str(e)
        path, error = self.dist.broadcast((path, error))
        if error is not None:
            self.rollback_or_stop(error)
            return None
        return path

    def load_latest(self, check: Callable[[dict[str, Any]], None] | None = None) -> Checkpoint | None:
        """The newest intact checkpoint: rank 0 verifies (setting damaged ones aside) before the others read."""
        ck = self.dist.main_first(lambda: self.checkpointer.load_latest(self.state, report=self.warn, check=check))
        self.checkpointer.install(self.state)  # every rank together (FSDP2 shards what it read)
        return ck

    def rollback_or_stop(self, reason: str) -> None:
        """train.nonfinite.on_limit: back to the newest intact checkpoint at a lower lr, or stop."""
        p, policy = self.progress, self.policy
        at = p.step
        if policy.on_limit == "stop" or p.rollbacks >= policy.max_rollbacks:
            why = (
                "train.nonfinite.on_limit is stop"
                if policy.on_limit == "stop"
                else f"all {policy.max_rollbacks} rollbacks that train.nonfinite.max_rollbacks allows are used"
            )
            newest = self.checkpointer.latest()
            raise NonFiniteError(
                f"{reason} (step {at}); stopping because {why}. The newest checkpoint is "
                f"{newest.name if newest else 'none'}: lower optimizer.lr or raise optimizer.warmup "
                f"and start a new run, or continue with {self.resume_hint}"
            )
        kept = {k: getattr(p, k) for k in KEPT_ON_ROLLBACK}
        lr_scale = p.lr_scale * policy.lr_factor
        ck = self.load_latest()
        if ck is None:
            raise NonFiniteError(
                f"{reason} (step {at}), before the first checkpoint, so there is nothing to "
                "roll back to; lower optimizer.lr, raise optimizer.warmup or checkpoint earlier "
                "(train.checkpoint_every), and start again"
            )
        self.restore(ck)
        p = self.progress
        for k, v in kept.items():
            setattr(p, k, v)
        p.rollbacks += 1
        p.lr_scale, p.consecutive_skips = lr_scale, 0
        self.metrics.truncate_after(p.step, keep_events=_FAULT_EVENTS)
        self.record_damage()
        self.records.rollback(p, at, reason, ck.path.name, policy.max_rollbacks)

    def write_summary(self, final: dict[int, float], path: Path) -> dict[str, Any]:
        p = self.progress
        summary = {
            "name": self.cfg.name,
            "steps": p.step,
            "tokens": p.tokens,
            "flops": p.flops,
            "train_time": p.train_time,
            "compile_time": p.compile_time,
            "val_loss": {str(k): v for k, v in final.items()},
            "skipped_steps": p.skipped_steps,
            "skipped_tokens": p.skipped_tokens,
            "rollbacks": p.rollbacks,
            "lr_scale": p.lr_scale,
            "precision": self.state.precision.as_dict(),
            "checkpoint": str(path),
            "metrics": str(self.out / "metrics.jsonl"),
        }
        if self.clock_scale != 1:
            summary["clock_scale"] = self.clock_scale  # the testing hook made its times lie: say so
        if self.dist.main:
            write_record_file(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary


class _StepProfiler:
    """torch.profiler over one step: the seconds spent in the step's labelled regions (forward,
    backward, optimizer: rampup.engine.step.REGIONS) and the rest (host work)."""

    def __enter__(self) -> _StepProfiler:

        self._prof = profile(activities=[ProfilerActivity.CPU])
        with _quiet_fd2():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        with _quiet_fd2():
            self._prof.__exit__(*exc)

    def seconds(self, total: float) -> dict[str, float]:
        spent = {e.key: e.cpu_time_total / 1e6 for e in self._prof.key_averages() if e.key in REGIONS}
        out = {r.split(".", 1)[1]: spent.get(r, 0.0) for r in REGIONS}
        out["host"] = max(0.0, total - sum(out.values()))
        return out


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Kineto prints a line to the process's stderr at every profiler start and stop: not for the user."""

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def train(
    cfg: TrainerSettings,
    *,
    resume: bool = False,
    display_mode: str | None = None,
    build_model: Callable[[TrainerSettings, torch.device], ModelAdapter] | None = None,
    task: Task | None = None,
    data: RunData | None = None,
) -> dict[str, Any]:
    """Run (or resume) a whole training run; returns the summary also written to summary.json.

    ``build_model(cfg, device) -> ModelAdapter`` (called once torch's RNG is seeded with
    train.seed), ``task`` and ``data`` replace the reference decoder LM, next-token prediction and
    the token corpus of ``cfg`` (tests/unit/engine/test_seams.py trains a vector classifier this way)."""
    return Trainer(cfg, resume=resume, display_mode=display_mode, build_model=build_model, task=task, data=data).run()
