"""The training loop: schedule -> sampler -> model step, with metrics, evaluation and checkpoints.

The pieces are plain functions so a user can call them in a loop of their own:
:func:`train_step` (one optimizer step at any batch shape, with gradient accumulation),
:func:`evaluate` (held-out loss at one context length) and :func:`train` (the whole run from a
:class:`RunConfig`, resumable). The model knows nothing of any of this.

Quick check on a CPU (about a minute)::

    rampup train configs/tiny.yaml
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rampup.config import RunConfig, dump_config
from rampup.data.dataset import TokenDataset
from rampup.data.prepare import get_prepared, load_prepared_tokenizer
from rampup.data.packing import document_positions, segment_ids
from rampup.data.samplers import EVAL_WINDOWS, Sampler, sampler_for_run
from rampup.engine.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_latest,
    remove_partial_writes,
    save_checkpoint,
)
from rampup.engine.faults import NanInjector, StallInjector, finite_json
from rampup.engine.metrics import Display, MetricsWriter, tensorboard_writer
from rampup.errors import ConfigError, DataError, NonFiniteError, RampupError
from rampup.knobs import KNOBS
from rampup.models.llm import DecoderLM, flops_per_token
from rampup.longeval import PasskeyTemplate, inject_passkeys, passkey_accuracy
from rampup.models.attention import layer_patterns
from rampup.models.rope import apply_rope_spec
from rampup.optim import build_optimizer, lr_at
from rampup.plan import step_shapes
from rampup.precision import Precision, autocast, bf16_slow_warning, resolve_precision
from rampup.schedule import Schedule
from rampup.units import Duration, Unit


class Interrupted(RampupError):
    """Training stopped by a signal after writing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    train_time: float = 0.0
    """Seconds spent in training steps only (evaluation, checkpointing and compiling excluded)."""
    compile_time: float = 0.0
    """Seconds of the steps that compiled a new graph (train.compile), kept out of train_time."""
    skipped_steps: int = 0
    """Steps not applied because their loss or gradient norm was not finite (train.nonfinite)."""
    skipped_tokens: int = 0
    """Tokens of the skipped steps: served by the sampler, never trained on."""
    consecutive_skips: int = 0
    """Skipped steps in a row up to now; train.nonfinite.max_skips of them trigger on_limit."""
    rollbacks: int = 0
    """Rollbacks to an earlier checkpoint so far (train.nonfinite.on_limit: rollback)."""
    lr_scale: float = 1.0
    """Learning-rate multiple left by rollbacks (train.nonfinite.lr_factor per rollback)."""


# What a rollback keeps from the timeline it abandons: the record of work done and faults met.
_KEPT_ON_ROLLBACK = ("flops", "train_time", "compile_time", "skipped_steps", "skipped_tokens", "rollbacks")
_FAULT_EVENTS = ("skip", "rollback")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    precision: str = "auto",
    micro_batch_tokens: int | None = None,
    grad_clip: float | None = None,
    attn_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One optimizer step on inputs/targets (B, T); returns (mean loss, grad norm before clipping).

    If the loss or the gradient norm is not finite the gradients are discarded and the optimizer
    is not stepped (its state is untouched); the returned values say so. A batch larger than
    ``micro_batch_tokens`` is split by rows and the gradients accumulated, each micro-batch
    weighted by its share of tokens so the result equals the unsplit step. ``attn_mask`` (B, 1, T, T)
    bool, ``segments`` (B, T) document ids and ``positions`` (B, T), when given, go to the model
    with their rows (document-masked packing).
    """
    B, T = x.shape
    rows = B if micro_batch_tokens is None else max(1, min(B, micro_batch_tokens // T))
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=x.device)
    ctx = autocast(x.device, precision)
    for i in range(0, B, rows):
        xb, yb = x[i:i + rows], y[i:i + rows]
        extra = {}
        if attn_mask is not None:
            extra["attn_mask"] = attn_mask[i:i + rows]
        if positions is not None:
            extra["positions"] = positions[i:i + rows]
        if segments is not None:
            extra["segments"] = segments[i:i + rows]
        with ctx:
            logits = model(xb, **extra)  # (b, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten())
        loss = loss * (xb.shape[0] / B)
        loss.backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else math.inf)
    loss_value, norm_value = total.item(), norm.item()  # the one host sync of the step
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, *, precision: str = "auto",
             batch_tokens: int = 16384) -> float:
    """Mean next-token loss over ``windows`` (N, T+1), every position scored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    T = windows.shape[1] - 1
    rows = max(1, batch_tokens // T)
    loss_sum, count = 0.0, 0
    for i in range(0, windows.shape[0], rows):
        w = windows[i:i + rows].to(device)
        with autocast(device, precision):
            logits = model(w[:, :-1])
        loss_sum += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return loss_sum / count


def _every(d: Duration | None, total_tokens: int):
    """A predicate (step, tokens_before, tokens_after) -> bool firing every ``d``."""
    if d is None:
        return lambda step, before, after: False
    if d.unit is Unit.STEP:
        n = int(d.value)
        return lambda step, before, after: step % n == 0
    n = max(1, d.to_tokens(total_tokens=total_tokens))
    return lambda step, before, after: after // n > before // n


def _jsonable(knobs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(mode="json", exclude_defaults=True) if hasattr(v, "model_dump") else v
            for k, v in knobs.items()}


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


_COMPARED_ON_RESUME = ("model", "data", "schedule", "optimizer")


def _check_resumable(saved: dict[str, Any], cfg: RunConfig) -> None:
    now = cfg.model_dump(mode="json", by_alias=True)
    diff = [k for k in _COMPARED_ON_RESUME if saved.get(k) != now.get(k)]
    for k in ("duration", "seed", "precision", "micro_batch_tokens"):
        if saved.get("train", {}).get(k) != now["train"].get(k):
            diff.append(f"train.{k}")
    if diff:
        raise ConfigError(f"the config differs from the checkpoint's in: {', '.join(diff)}; resume with the "
                          "config the run started with (saved as config.yaml in the run folder)")


def saved_precision(state: dict[str, Any], device: torch.device) -> Precision:
    """The precision a checkpoint's run trained in (bitwise resume keeps it on any machine).

    Checkpoints written before train.precision: auto carry none: they trained in their config's
    precision, bf16 unless it said fp32."""
    saved = state.get("precision")
    if saved is None:
        requested = state.get("config", {}).get("train", {}).get("precision", "bf16")
        saved = {"precision": "fp32" if requested == "fp32" else "bf16", "requested": requested,
                 "reason": "written before train.precision: auto"}
    here = resolve_precision("auto", device)  # native_bf16 describes the machine it runs on now
    return Precision(saved["precision"], saved.get("requested", saved["precision"]), here.native_bf16,
                     saved.get("reason", ""))


@dataclass
class RunInputs:
    """What :func:`prepare_run` checked and built: everything a run reads, before any compute."""

    schedule: Schedule
    train_ds: TokenDataset
    val_ds: TokenDataset
    eval_lens: list[int]
    sampler: Sampler
    shapes: set[tuple[int, int]]
    """Every (rows, seq_len) batch shape the run will train at, micro-batch splits included."""


def _micro_shapes(rows: int, seq_len: int, micro_batch_tokens: int | None) -> set[tuple[int, int]]:
    per = rows if micro_batch_tokens is None else max(1, min(rows, micro_batch_tokens // seq_len))
    return {(per, seq_len)} | ({(rows % per, seq_len)} if rows % per else set())


def prepare_run(cfg: RunConfig) -> RunInputs:
    """Everything that can fail on bad input, done before any training compute."""
    prepared = get_prepared(cfg.data)
    train_ds = TokenDataset.open(prepared, "train", verify=cfg.data.verify_checksums)
    val_ds = TokenDataset.open(prepared, "val", verify=cfg.data.verify_checksums)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {train_ds.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set model.vocab_size >= {train_ds.vocab_size}")
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=train_ds.n_tokens)
    eval_lens = cfg.eval.seq_lens or [schedule.max_knob("seq_len")]
    for n in eval_lens:
        if val_ds.n_tokens < n + 1:
            raise DataError(f"the validation split has {val_ds.n_tokens} tokens, too few for eval at seq_len {n}; "
                            "raise data.val_fraction or lower eval.seq_lens")
    sampler = sampler_for_run(cfg.data, train_ds, cfg.train.seed, schedule)
    shapes: set[tuple[int, int]] = set()
    for rows, seq_len in step_shapes(cfg, schedule):  # for buckets: the whole run's draws, dry
        shapes |= _micro_shapes(rows, seq_len, cfg.train.micro_batch_tokens)
    if cfg.train.compile and len(shapes) > cfg.train.compile_max_graphs:
        raise ConfigError(
            f"train.compile: the run trains at {len(shapes)} distinct batch shapes, more than "
            f"train.compile_max_graphs ({cfg.train.compile_max_graphs}), and each shape compiles its own "
            "graph; bucket the lengths (data.sampler: buckets, a seq_len ramp: step, or a coarser "
            "multiple_of), raise compile_max_graphs, or turn compile off")
    return RunInputs(schedule, train_ds, val_ds, eval_lens, sampler, shapes)


def train(cfg: RunConfig, *, resume: bool = False, display_mode: str | None = None) -> dict[str, Any]:
    """Run (or resume) a whole training run; returns the summary also written to summary.json."""
    inputs = prepare_run(cfg)
    schedule, sampler, eval_lens = inputs.schedule, inputs.sampler, inputs.eval_lens
    out = cfg.resolved_out_dir()
    ckpt_dir = out / "checkpoints"
    found = latest_checkpoint(ckpt_dir)
    if found is not None and not resume:
        raise ConfigError(f"{out} already holds a checkpoint ({found.name}); pass --resume to continue it, "
                          "or choose another name / train.out_dir for a new run")
    if resume and found is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start")
    nan_faults = NanInjector.from_env()
    stall_faults = StallInjector.from_env()
    policy = cfg.train.nonfinite

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)  # a bf16 request CUDA cannot honour fails here
    torch.manual_seed(cfg.train.seed)
    model = DecoderLM(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optimizer)
    step_model = model
    if cfg.train.compile:
        # One static graph per batch shape: the shapes are few (checked in prepare_run), and static
        # graphs are the fastest; dynamo must be allowed to keep all of them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(inputs.shapes) + 1)
        step_model = torch.compile(model, backend=cfg.train.compile_backend, dynamic=False)
    make_windows = EVAL_WINDOWS[cfg.eval.windows]
    val_windows = {n: make_windows(inputs.val_ds, n, cfg.eval.max_tokens) for n in eval_lens}
    eot = inputs.train_ds.eot_id
    template = PasskeyTemplate(load_prepared_tokenizer(inputs.train_ds.folder))
    passkey_stream = np.concatenate([inputs.val_ds.doc(i) for i in range(inputs.val_ds.n_docs)])
    progress = Progress()

    tb = tensorboard_writer(out / "tensorboard") if cfg.log.tensorboard else None  # fails before training
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsWriter(out / "metrics.jsonl", tensorboard=tb)
    total_steps = schedule.num_steps()
    display = Display(display_mode or cfg.log.progress, total_steps, schedule.total_tokens, int(cfg.log.every.value))
    should_eval = _every(cfg.eval.every, schedule.total_tokens)
    should_save = _every(cfg.train.checkpoint_every, schedule.total_tokens)
    config_dump = cfg.model_dump(mode="json", by_alias=True)
    resume_hint = f"rampup train {out / 'config.yaml'} --resume"

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)
        # no step: the record stays through every later resume or rollback, as the damaged folder does
        metrics.write({"event": "damaged_checkpoint", "message": message})

    stage_index, data_epoch = -1, sampler.epoch  # what the loop last announced

    def restore(ck: Checkpoint) -> None:
        nonlocal progress, stage_index, data_epoch, precision
        progress = Progress(**ck.state["progress"])
        precision = saved_precision(ck.state, device)
        sampler.load_state_dict(ck.state["sampler"])
        stage_index = schedule.stage_at(progress.tokens).index if progress.step else -1
        data_epoch = sampler.epoch

    def checkpoint() -> Path:
        state = {"progress": asdict(progress), "sampler": sampler.state_dict(), "config": config_dump,
                 "precision": precision.as_dict()}
        return save_checkpoint(ckpt_dir, progress.step, model, optimizer, state, keep=cfg.train.keep_checkpoints)

    def rollback_or_stop(reason: str) -> None:
        """train.nonfinite.on_limit: back to the newest intact checkpoint at a lower lr, or stop."""
        at = progress.step
        if policy.on_limit == "stop" or progress.rollbacks >= policy.max_rollbacks:
            why = ("train.nonfinite.on_limit is stop" if policy.on_limit == "stop" else
                   f"all {policy.max_rollbacks} rollbacks that train.nonfinite.max_rollbacks allows are used")
            newest = latest_checkpoint(ckpt_dir)
            raise NonFiniteError(f"{reason} (step {at}); stopping because {why}. The newest checkpoint is "
                                 f"{newest.name if newest else 'none'}: lower optimizer.lr or raise optimizer.warmup "
                                 f"and start a new run, or continue with {resume_hint}")
        kept = {k: getattr(progress, k) for k in _KEPT_ON_ROLLBACK}
        lr_scale = progress.lr_scale * policy.lr_factor
        ck = load_latest(ckpt_dir, model, optimizer, report=warn)
        if ck is None:
            raise NonFiniteError(f"{reason} (step {at}), before the first checkpoint, so there is nothing to "
                                 "roll back to; lower optimizer.lr, raise optimizer.warmup or checkpoint earlier "
                                 "(train.checkpoint_every), and start again")
        restore(ck)
        for k, v in kept.items():
            setattr(progress, k, v)
        progress.rollbacks += 1
        progress.lr_scale, progress.consecutive_skips = lr_scale, 0
        metrics.truncate_after(progress.step, keep_events=_FAULT_EVENTS)
        metrics.write({"event": "rollback", "step": progress.step, "from_step": at, "reason": reason,
                       "checkpoint": ck.path.name, "lr_scale": lr_scale})
        display.print(f"{reason} at step {at}: rolled back to {ck.path.name} with the learning rate x{lr_scale:g} "
                      f"(rollback {progress.rollbacks} of at most {policy.max_rollbacks})")

    def save_or_roll_back() -> Path | None:
        try:
            return checkpoint()
        except NonFiniteError as e:
            rollback_or_stop(str(e))
            return None

    rope = {"spec": None, "len": None}  # what the model's RoPE tables hold now

    def set_rope(spec, seq_len: int) -> None:
        """Apply a stage's rope knob to the live model when it (or, for dynamic NTK, the length) changes."""
        if spec != rope["spec"] or (spec.method == "dynamic_ntk" and seq_len != rope["len"]):
            apply_rope_spec(model, spec, seq_len)
            rope.update(spec=spec, len=seq_len)

    attention = {"now": None}

    def set_attention(spec, window: int) -> None:
        """Apply a stage's attention pattern (per layer) to the live model when it changes."""
        if attention["now"] != (spec, window):
            model.set_attention(layer_patterns(spec, window, cfg.model.n_layers))
            attention["now"] = (spec, window)

    def run_eval() -> dict[int, float]:
        losses = {}
        spec = schedule.at(min(progress.tokens, schedule.total_tokens - 1))["rope"]
        for n, w in val_windows.items():
            set_rope(spec, n)
            losses[n] = evaluate(model, w, precision=precision.precision)
            if cfg.eval.passkey_samples and n >= template.min_len():
                acc = passkey_accuracy(model, template, passkey_stream, [n], cfg.eval.passkey_depths,
                                       cfg.eval.passkey_samples, seed=cfg.train.seed, precision=precision.precision)[n]
                metrics.write({"event": "passkey", "step": progress.step, "tokens": progress.tokens, "seq_len": n,
                               "accuracy": {f"{d:g}": a for d, a in acc.items()},
                               "mean": sum(acc.values()) / len(acc), "train_time": progress.train_time})
            metrics.write({"event": "eval", "step": progress.step, "tokens": progress.tokens, "seq_len": n,
                           "loss": losses[n], "train_time": progress.train_time, "flops": progress.flops})
        display.print(f"eval @ step {progress.step}: " + ", ".join(f"loss@{n} {v:.4f}" for n, v in losses.items()))
        return losses

    try:
        removed = remove_partial_writes(ckpt_dir)
        if removed:
            display.print(f"removed what a killed checkpoint write left in {ckpt_dir}: {', '.join(removed)}")
        if resume:
            ck = load_latest(ckpt_dir, model, optimizer, report=warn,
                             check=lambda state: _check_resumable(state["config"], cfg))
            restore(ck)
            metrics.truncate_after(progress.step)
        else:
            (out / "config.yaml").write_text(dump_config(cfg))
            metrics.truncate_after(0)
            metrics.write({"event": "run", "step": 0, "name": cfg.name, "device": str(device),
                           "precision": precision.as_dict()})
        display.print(f"run '{cfg.name}': {total_steps} steps, {schedule.total_tokens:,} tokens, "
                      f"{model.num_params():,} non-embedding parameters, device {device}, output {out}"
                      + (f" (resumed at step {progress.step})" if resume else ""))
        display.print(precision.line() + (" -- kept from the run's start, for a bitwise resume" if resume else ""))
        slow = bf16_slow_warning(precision, device, resumed=resume)
        if slow:
            print(f"warning: {slow}", file=sys.stderr, flush=True)
        seen_shapes: set[tuple[int, int]] = set()
        model.train()
        with _SignalFlag() as flag:
            while True:
                while progress.tokens < schedule.total_tokens:
                    sp = schedule.step_at(progress.step, progress.tokens)
                    stage = schedule.stages[sp.stage]
                    if sp.stage != stage_index:
                        stage_index = sp.stage
                        metrics.write({"event": "stage", "step": progress.step, "tokens": progress.tokens,
                                       "stage": stage.index, "stage_name": stage.name,
                                       "knobs": _jsonable(sp.knobs)})
                        display.print(f"stage {stage.index} '{stage.name}' at step {progress.step}: " +
                                      ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                                for k, v in sp.knobs.items()
                                                if k in ("seq_len", "batch_tokens") or v != KNOBS[k].default))
                    t0 = time.perf_counter()
                    x, y = sampler.take(sp)
                    if sp.knobs["passkey_fraction"] > 0:  # mix synthetic retrieval rows into the batch
                        inject_passkeys(x, y, sp.knobs["passkey_fraction"], template,
                                        np.random.default_rng([cfg.train.seed, progress.step, 7]))
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    set_rope(sp.knobs["rope"], x.shape[1])
                    set_attention(sp.knobs["attention"], sp.knobs["window"])
                    seg = positions = None
                    if cfg.data.doc_mask:
                        # per-document attention calls: 0.71x the time of SDPA with a block-diagonal
                        # mask on this CPU (benchmarks/results/doc_mask.json)
                        seg = segment_ids(x, eot)  # (B, T) document index within each row
                        positions = document_positions(seg) if cfg.data.restart_positions else None
                    # the step's lr is the schedule's value at the end of the step, so warmup's first step is not ~0
                    lr = (lr_at(cfg.optimizer, progress.tokens + sp.tokens, schedule.total_tokens)
                          * sp.knobs["lr_mult"] * progress.lr_scale)
                    stall_faults.maybe_stall(progress.step + 1)
                    with nan_faults.poison(step_model, progress.step + 1):
                        loss, gnorm = train_step(step_model, optimizer, x, y, lr=lr, precision=precision.precision,
                                                 micro_batch_tokens=cfg.train.micro_batch_tokens,
                                                 grad_clip=cfg.optimizer.grad_clip, segments=seg,
                                                 positions=positions)
                    dt = time.perf_counter() - t0
                    B, T = x.shape  # the sampler's shape: the buckets sampler picks T itself
                    n_tok = B * T
                    compiled = cfg.train.compile and (B, T) not in seen_shapes
                    seen_shapes.add((B, T))
                    before = progress.tokens
                    progress.step += 1
                    progress.tokens += n_tok
                    progress.flops += flops_per_token(cfg.model, T) * n_tok
                    if compiled:
                        progress.compile_time += dt
                    else:
                        progress.train_time += dt
                    if math.isfinite(loss) and math.isfinite(gnorm):
                        progress.consecutive_skips = 0
                        rec = {"event": "step", "step": progress.step, "tokens": progress.tokens, "loss": loss,
                               "lr": lr, "grad_norm": gnorm, "seq_len": T, "batch_size": B,
                               "stage": stage.index, "stage_name": stage.name, "tok_per_s": n_tok / dt,
                               "step_time": dt, "train_time": progress.train_time, "flops": progress.flops,
                               "wall": time.time()}
                        if compiled:
                            rec["compiled"] = True
                            rec["compile_time"] = progress.compile_time
                        metrics.write(rec)
                        eta = progress.train_time / max(1, progress.tokens) * max(0, schedule.total_tokens - progress.tokens)
                        display.step(rec, eta)
                    else:
                        progress.skipped_steps += 1
                        progress.skipped_tokens += n_tok
                        progress.consecutive_skips += 1
                        metrics.write({"event": "skip", "step": progress.step, "tokens": progress.tokens,
                                       "loss": finite_json(loss), "grad_norm": finite_json(gnorm), "lr": lr,
                                       "in_a_row": progress.consecutive_skips})
                        display.print(f"step {progress.step}: loss {loss}, grad norm {gnorm}: skipped, not applied "
                                      f"({progress.consecutive_skips} in a row; {policy.max_skips} trigger "
                                      f"{policy.on_limit})")
                        if progress.consecutive_skips >= policy.max_skips:
                            rollback_or_stop(f"{progress.consecutive_skips} steps in a row had a non-finite loss "
                                             "or gradient norm")
                            continue
                    if sampler.epoch != data_epoch:
                        data_epoch = sampler.epoch
                        metrics.write({"event": "data_epoch", "step": progress.step, "epoch": data_epoch})
                        display.print(f"the sampler started data epoch {data_epoch} at step {progress.step} "
                                      "(every sequence of the earlier epoch has been served)")
                    done = progress.tokens >= schedule.total_tokens
                    if should_eval(progress.step, before, progress.tokens) and not done:
                        run_eval()
                    if flag.signum is not None:
                        path = save_or_roll_back() or latest_checkpoint(ckpt_dir)
                        raise Interrupted(f"stopped by signal {flag.signum} after step {progress.step}; checkpoint "
                                          f"{path}. Resume with: {resume_hint}", 128 + flag.signum)
                    if should_save(progress.step, before, progress.tokens) and not done:
                        save_or_roll_back()
                final = run_eval()
                path = save_or_roll_back()
                if path is not None:
                    break
    finally:
        display.close()
        metrics.close()
    summary = {"name": cfg.name, "steps": progress.step, "tokens": progress.tokens, "flops": progress.flops,
               "train_time": progress.train_time, "compile_time": progress.compile_time,
               "val_loss": {str(k): v for k, v in final.items()},
               "skipped_steps": progress.skipped_steps, "skipped_tokens": progress.skipped_tokens,
               "rollbacks": progress.rollbacks, "lr_scale": progress.lr_scale, "precision": precision.as_dict(),
               "checkpoint": str(path), "metrics": str(out / "metrics.jsonl")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
