"""Metrics (a JSONL file, the canonical record of a run) and the console display.

Each line of ``metrics.jsonl`` is one event: ``{"event": "step", ...}`` every optimizer step,
``{"event": "eval", ...}`` per evaluated context length, ``{"event": "stage", ...}`` at each stage
start; ``skip`` (a step with a non-finite loss or gradient norm, not applied), ``rollback`` and
``damaged_checkpoint`` record faults. On resume the file is cut back to the checkpoint's step, so it
always describes one uninterrupted run; a rollback cuts it back too but keeps its fault records.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rampup.engine.faults import finite_json
from rampup.engine.loggers import Logger
from rampup.errors import DataError, RecordWriteError
from rampup.units import format_tokens


def select_eval_set(records: list[dict[str, Any]], on: str | None, where: Any = "") -> list[dict[str, Any]]:
    """The records with the evaluations of set ``on`` (a mixture's source) as the run's evaluations, the
    others dropped; ``on=None`` keeps the run's main evaluations. A run that evaluated no set ``on`` but
    has one corpus (no data.sources) keeps its main evaluations: that corpus is the one compared."""
    if on is None:
        return [r for r in records if not (r.get("event") == "eval" and "set" in r)]
    sets = {r["set"] for r in records if r.get("event") == "eval" and "set" in r}
    if on not in sets:
        if sets:
            raise DataError(
                f"the run in {where} evaluated no source named '{on}'; its sources: {', '.join(sorted(sets))}"
            )
        return select_eval_set(records, None)
    out = []
    for r in records:
        if r.get("event") != "eval":
            out.append(r)
        elif r.get("set") == on:
            out.append({k: v for k, v in r.items() if k != "set"})
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file; a line cut off by a crash is ignored."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _write_failed(path: Path, e: OSError) -> RecordWriteError:
    return RecordWriteError(
        f"could not write the run's record {path}: {e.strerror or e}; the run's checkpoints are untouched (the "
        "record is cut back to the checkpoint on resume). Free disk space or fix the folder's permissions, then "
        "continue with: rampup train CONFIG --resume"
    )


def write_record_file(path: Path, text: str) -> None:
    """Write one file of the run's record (config.yaml, summary.json) whole, or raise :class:`RecordWriteError`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, e) from None


class MetricsWriter:
    """Appends one JSON object per line; ``truncate_after(step)`` rewinds it for a resumed run.

    The JSONL file is the canonical record; ``mirrors`` (rampup.engine.loggers: TensorBoard, W&B)
    get every record after it is written.
    """

    def __init__(self, path: Path, mirrors: Sequence[Logger] = ()) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f: TextIO = open(path, "a")
        except OSError as e:
            raise self._failed(e) from None
        self._mirrors = list(mirrors)

    def _failed(self, e: OSError) -> RecordWriteError:
        return _write_failed(self.path, e)

    def truncate_after(self, step: int, keep_events: tuple[str, ...] = ()) -> None:
        """Keep only records of steps <= ``step`` (what the checkpoint being resumed had seen), and
        those of the ``keep_events`` kinds (a rollback keeps the record of the steps it undid).
        Written to a new file and renamed over the old one: a failure leaves the old record whole."""
        self._close_file()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step or r.get("event") in keep_events]
        tmp = self.path.with_suffix(".jsonl.tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
            self._f = open(self.path, "a")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._failed(e) from None

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            raise self._failed(e) from None
        for mirror in self._mirrors:
            mirror.log(record)

    def _close_file(self) -> None:
        try:
            self._f.close()
        except OSError:  # the buffered tail could not be written: the record was already reported failed
            pass

    def close(self) -> None:
        self._close_file()
        for mirror in self._mirrors:
            mirror.close()


class NullMetrics:
    """The metrics of a rank other than 0 in a distributed run: rank 0 writes the one record."""

    path = None

    def truncate_after(self, step: int, keep_events: tuple[str, ...] = ()) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Display:
    """Live rich progress on a terminal; plain lines every ``every`` steps otherwise; or nothing."""

    def __init__(
        self, mode: str, total_steps: int, total_tokens: int, every: int, stream: TextIO | None = None
    ) -> None:
        stream = stream or sys.stdout
        if mode == "auto":
            mode = "rich" if stream.isatty() else "plain"
        self.mode, self.every, self.total_steps, self.total_tokens = mode, every, total_steps, total_tokens
        self.console = Console(file=stream)
        self._stream = stream
        self._progress: Progress | None = None
        if mode == "rich":
            self._progress = Progress(
                TextColumn("[bold]{task.fields[stage]}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, stage="", info="")
            self._progress.start()

    def print(self, message: str) -> None:
        if self.mode == "off":
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=self._stream, flush=True)

    def step(self, rec: dict[str, Any], eta_s: float) -> None:
        info = (
            f"seq {rec['seq_len']} x{rec['batch_size']} | loss {rec['loss']:.4f} | "
            f"{format_tokens(rec['tok_per_s'])} tok/s"
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=rec["step"], stage=rec["stage_name"], info=info)
        elif self.mode == "plain" and (rec["step"] % self.every == 0 or rec["step"] == self.total_steps):
            print(
                f"step {rec['step']}/{self.total_steps} | {rec['stage_name']} | {info} | lr {rec['lr']:.2e} | "
                f"{format_tokens(rec['tokens'])}/{format_tokens(self.total_tokens)} tok | eta {_fmt_time(eta_s)}",
                file=self._stream,
                flush=True,
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did (Trainer.train_step returns it)."""

    step: int
    """The step's number (1 for the first)."""
    tokens: int
    """Tokens of the global batch."""
    rows: int
    seq_len: int
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    flops: float
    """Training FLOPs of the global batch."""
    compiled: bool = False
    """The step compiled a new graph (its time counts as compile time)."""
    applied: bool = True
    """False: the loss or gradient norm was not finite, and the update was skipped."""
    rolled_back: bool = False
    """A streak of skipped steps rolled the run back to its newest intact checkpoint."""


def step_record(p: Any, r: StepResult, stage: int, stage_name: str, roof_flops: float = 0.0) -> dict[str, Any]:
    """The ``step`` event of an applied step (``p``: the Progress after it; ``roof_flops``: the job's
    matmul roof in FLOP/s, 0 when unknown)."""
    achieved = r.flops / r.seconds  # honest FLOPs per second of the whole job
    rec = {
        "event": "step",
        "step": p.step,
        "tokens": p.tokens,
        "loss": r.loss,
        "lr": r.lr,
        "grad_norm": r.grad_norm,
        "seq_len": r.seq_len,
        "batch_size": r.rows,
        "stage": stage,
        "stage_name": stage_name,
        "tok_per_s": r.tokens / r.seconds,
        "step_time": r.seconds,
        "train_time": p.train_time,
        "flops": p.flops,
        "flops_per_s": achieved,
        "wall": time.time(),
    }
    if roof_flops:
        rec["roof_share"] = achieved / roof_flops
    if r.compiled:
        rec["compiled"] = True
        rec["compile_time"] = p.compile_time
    return rec


def skip_record(p: Any, r: StepResult) -> dict[str, Any]:
    """The ``skip`` event of a step whose update was not applied."""
    return {
        "event": "skip",
        "step": p.step,
        "tokens": p.tokens,
        "loss": finite_json(r.loss),
        "grad_norm": finite_json(r.grad_norm),
        "lr": r.lr,
        "in_a_row": p.consecutive_skips,
    }


def _knob_text(knobs: dict[str, Any], defaults: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in knobs.items() if v != defaults.get(k)
    )


def _jsonable(knobs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.model_dump(mode="json", exclude_defaults=True) if hasattr(v, "model_dump") else v for k, v in knobs.items()
    }


class Records:
    """What the loop writes to the run's record (metrics.jsonl and its mirrors) and says on the console,
    one method per event, so that the loop itself holds neither dicts nor messages."""

    def __init__(self, metrics: Any, display: Any) -> None:
        self.metrics, self.display = metrics, display

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)

    def stage(self, p: Any, index: int, name: str, knobs: dict[str, Any], defaults: dict[str, Any]) -> None:
        self.metrics.write(
            {
                "event": "stage",
                "step": p.step,
                "tokens": p.tokens,
                "stage": index,
                "stage_name": name,
                "knobs": _jsonable(knobs),
            }
        )
        self.display.print(f"stage {index} '{name}' at step {p.step}: " + _knob_text(knobs, defaults))

    def step(self, p: Any, r: StepResult, stage: int, stage_name: str, roof_flops: float, eta: float) -> None:
        rec = step_record(p, r, stage, stage_name, roof_flops)
        self.metrics.write(rec)
        self.display.step(rec, eta)

    def skip(self, p: Any, r: StepResult, max_skips: int, on_limit: str) -> None:
        self.metrics.write(skip_record(p, r))
        self.display.print(
            f"step {p.step}: loss {r.loss}, grad norm {r.grad_norm}: skipped, not applied "
            f"({p.consecutive_skips} in a row; {max_skips} trigger {on_limit})"
        )

    def profile(self, p: Any, rows: int, seq_len: int, seconds: float, regions: dict[str, float]) -> None:
        self.metrics.write(
            {"event": "profile", "step": p.step, "rows": rows, "seq_len": seq_len, "step_time": seconds, **regions}
        )

    def data_epoch(self, p: Any, epoch: int) -> None:
        self.metrics.write({"event": "data_epoch", "step": p.step, "epoch": epoch})
        self.display.print(
            f"the sampler started data epoch {epoch} at step {p.step} "
            "(every sequence of the earlier epoch has been served)"
        )

    def eval_length(
        self, p: Any, seq_len: int, loss: float, part: str | None = None, accuracy: float | None = None
    ) -> None:
        """One evaluation length's loss (and a classifier's accuracy); ``part`` names a part of the set (a
        mixture's source: ``"set"``)."""
        self.metrics.write(
            {
                "event": "eval",
                **({"set": part} if part is not None else {}),
                **({"accuracy": accuracy} if accuracy is not None else {}),
                "step": p.step,
                "tokens": p.tokens,
                "seq_len": seq_len,
                "loss": loss,
                "train_time": p.train_time,
                "compile_time": p.compile_time,
                "flops": p.flops,
            }
        )

    def evaluation(self, p: Any, losses: dict[int, float]) -> None:
        self.display.print(f"eval @ step {p.step}: " + ", ".join(f"loss@{n} {v:.4f}" for n, v in losses.items()))

    def passkey(self, p: Any, seq_len: int, accuracy: dict[float, float]) -> None:
        self.metrics.write(
            {
                "event": "passkey",
                "step": p.step,
                "tokens": p.tokens,
                "seq_len": seq_len,
                "accuracy": {f"{d:g}": a for d, a in accuracy.items()},
                "mean": sum(accuracy.values()) / len(accuracy),
                "train_time": p.train_time,
            }
        )

    def rollback(self, p: Any, at: int, reason: str, checkpoint: str, max_rollbacks: int) -> None:
        self.metrics.write(
            {
                "event": "rollback",
                "step": p.step,
                "from_step": at,
                "reason": reason,
                "checkpoint": checkpoint,
                "lr_scale": p.lr_scale,
            }
        )
        self.display.print(
            f"{reason} at step {at}: rolled back to {checkpoint} with the learning rate "
            f"x{p.lr_scale:g} (rollback {p.rollbacks} of at most {max_rollbacks})"
        )
