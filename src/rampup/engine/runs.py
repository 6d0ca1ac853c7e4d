"""Reading a run folder written by the engine: which checkpoint a path names, and the model and data
sections of the run's saved config (what a teacher, an initial-weights source or an evaluation needs)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from rampup.data.config import DataConfig
from rampup.engine.checkpoint.folders import latest_checkpoint
from rampup.errors import CheckpointError, ConfigError
from rampup.models.llm import ModelConfig


@dataclass(frozen=True)
class SavedRun:
    """A run folder's checkpoint and the sections of its config.yaml that describe its model and data."""

    folder: Path
    checkpoint: Path
    model: ModelConfig
    data: DataConfig
    config: dict
    """The whole saved config tree (rampup.config.RunConfig validates it)."""


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder or a checkpoint inside one."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path.parent.parent, path
    ckpt = latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint nor a run folder with checkpoints; "
            "give runs/NAME or runs/NAME/checkpoints/step_N"
        )
    return path, ckpt


def read_run(path: str | Path, command: str) -> SavedRun:
    """The run folder (or checkpoint) ``path`` for ``command`` (named in the error when its config is missing)."""
    run_dir, ckpt = find_checkpoint(path)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing; {command} reads the run's config from it")
    tree = yaml.safe_load(cfg_path.read_text()) or {}
    return SavedRun(
        run_dir,
        ckpt,
        ModelConfig.model_validate(tree.get("model") or {}),
        DataConfig.model_validate(tree.get("data") or {}),
        tree,
    )


def check_new_folder(out: Path) -> None:
    """An export's destination: a new or empty folder, refused before anything is read or written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; export into a new folder (nothing was written)")


@contextlib.contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """A folder written whole or not at all: the block fills a hidden sibling, renamed to ``out`` when it ends
    (removed if it fails)."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            out.rmdir()  # empty (check_new_folder)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
