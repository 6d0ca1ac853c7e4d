"""The logger seam: ``metrics.jsonl`` is the canonical record; other loggers mirror it.

Every record the engine writes goes to :class:`~rampup.engine.metrics.MetricsWriter` first, then to
each mirror through one interface, ``log(record)``, with no per-logger keys in the engine. A mirror
turns a record into its own calls: every finite number of a ``step`` record becomes a scalar
``train/KEY``, an ``eval`` record ``eval/loss@T``, a ``passkey`` record ``eval/passkey@T``; the
x-axis is the record's ``tokens``. Mirrors:

- TensorBoard (``log.tensorboard: true``, needs ``tensorboard``), into OUT_DIR/tensorboard;
- Weights & Biases (``log.wandb: offline | online``, needs ``wandb``), into OUT_DIR/wandb; offline
  mode needs no network (``wandb sync`` uploads later).

A missing package is a named error before any compute.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Protocol

from rampup.engine.config import LogConfig
from rampup.errors import ConfigError

_STEP_SKIP = ("event", "step", "tokens", "stage", "stage_name", "wall", "compiled")


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars a mirror shows for one metrics record (empty for records it does not plot)."""
    event = record.get("event")
    if event == "step":
        return {
            f"train/{k}": float(v)
            for k, v in record.items()
            if k not in _STEP_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
    if event == "eval":
        part = f"{record['set']}/" if "set" in record else ""
        out = {f"eval/{part}loss@{record['seq_len']}": float(record["loss"])}
        if "accuracy" in record:
            out[f"eval/{part}accuracy@{record['seq_len']}"] = float(record["accuracy"])
        return out
    if event == "passkey":
        return {f"eval/passkey@{record['seq_len']}": float(record["mean"])}
    return {}


class TensorBoardLogger:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "log.tensorboard is true but the tensorboard package is not installed; "
                "pip install tensorboard, or set log.tensorboard: false"
            ) from None
        self._w = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self._w.add_scalar(key, value, record["tokens"])

    def close(self) -> None:
        self._w.close()


class WandbLogger:
    """A Weights & Biases run in OUT_DIR/wandb; ``mode`` offline writes files only."""

    def __init__(self, out_dir: Path, name: str, config: dict[str, Any], mode: Literal["offline", "online"]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"log.wandb is {mode} but the wandb package is not installed; pip install wandb, or set log.wandb: off"
            ) from None
        out_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project="rampup", name=name, config=config, dir=str(out_dir), mode=mode, reinit="create_new"
        )

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self._run.log(values | {"tokens": record["tokens"]})

    def close(self) -> None:
        self._run.finish()


def build_loggers(log_cfg: LogConfig, out: Path, name: str, config: dict[str, Any]) -> list[Logger]:
    """The mirrors a LogConfig asks for (each fails here, before training, if its package is missing)."""
    loggers: list[Logger] = []
    if log_cfg.tensorboard:
        loggers.append(TensorBoardLogger(out / "tensorboard"))
    if log_cfg.wandb != "off":
        loggers.append(WandbLogger(out, name, config, log_cfg.wandb))
    return loggers
