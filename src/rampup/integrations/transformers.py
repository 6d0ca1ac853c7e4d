"""rampup inside ``transformers.Trainer`` (and TRL's trainers, which subclass it): :class:`RampupCallback`.

A callback cannot replace the Trainer's data loader, so curricula over the batch shape (``seq_len``
warmup, buckets, mixtures) reach the batches through the curriculum's
:class:`~rampup.integrations.curriculum.RampupDataset`, given as the Trainer's ``train_dataset`` with
``per_device_train_batch_size=1`` and its ``collate`` as the ``data_collator``. The callback applies each
step's knobs before its forward (``lr_mult`` and per-group multipliers at the optimizer step, RoPE at a
stage boundary, freezing), writes scalar knobs bound to attributes, logs the knob values to the Trainer's
loggers and saves the dataset's state in every Trainer checkpoint (``rampup_state.json``), so
``trainer.train(resume_from_checkpoint=...)`` resumes exactly.

Needs the ``transformers`` extra (``pip install 'rampup[transformers]'``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers
from transformers import TrainerCallback

from rampup.errors import ConfigError
from rampup.integrations.curriculum import Curriculum, check_loop
from rampup.schedule.registry import KNOBS

__all__ = ["STATE_FILE", "RampupCallback"]

STATE_FILE = "rampup_state.json"
"""The curriculum's state in a Trainer checkpoint folder."""

HOST = "a Hugging Face Trainer"


def _resolve(root: Mapping[str, Any], path: str) -> tuple[Any, str]:
    """(object, last name) of a dotted path such as ``trainer.generation_config.max_new_tokens``."""
    head, *rest = path.split(".")
    if head not in root or not rest:
        raise ConfigError(
            f"attribute path '{path}' must start with one of {', '.join(sorted(root))} and name an attribute "
            "(e.g. 'trainer.max_completion_length')"
        )
    obj = root[head]
    for name in rest[:-1]:
        obj = obj[name] if isinstance(obj, Mapping) else getattr(obj, name)
    return obj, rest[-1]


def _write(obj: Any, name: str, value: Any, path: str) -> None:
    if isinstance(obj, dict):
        obj[name] = value
    elif hasattr(obj, name):
        setattr(obj, name, value)
    else:
        raise ConfigError(f"attribute path '{path}': {type(obj).__name__} has no attribute '{name}'")


class RampupCallback(TrainerCallback):
    """Applies a :class:`~rampup.integrations.curriculum.Curriculum` inside a ``transformers.Trainer``.

    ``attributes`` binds scalar knobs to what they set each step: ``{knob: path or [paths]}``, a path
    starting at ``trainer``, ``args`` or ``model`` (``"trainer.max_completion_length"``; a dict is
    entered by key). Knobs this loop cannot apply (growth, distillation, ...) are refused here.

    Call :meth:`bind` with the Trainer: it adds the callback first among the Trainer's callbacks, so the
    knob values reach every logger, and gives the attribute paths their ``trainer``.
    """

    def __init__(self, curriculum: Curriculum, *, attributes: Mapping[str, str | Sequence[str]] | None = None):
        self.curriculum = curriculum
        self.attributes = {k: [v] if isinstance(v, str) else list(v) for k, v in (attributes or {}).items()}
        for knob in self.attributes:
            if knob not in KNOBS:
                raise ConfigError(f"attributes: '{knob}' is not a knob; register it first (rampup.knobs.register_knob)")
        curriculum.check_host(HOST, set(self.attributes))
        self.trainer: transformers.Trainer | None = None
        self._lrs: list[float] = []

    def bind(self, trainer: transformers.Trainer) -> RampupCallback:
        """Attach to ``trainer`` (first among its callbacks); returns the callback."""
        self.trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    @property
    def uses_data(self) -> bool:
        return self.curriculum.data is not None

    # ------------------------------------------------------------------ checks, before any step
    def _check_args(self, args: transformers.TrainingArguments, max_steps: int) -> None:
        accumulation = ("gradient_accumulation_steps", args.gradient_accumulation_steps)
        fix = "TrainingArguments(max_steps={n})"
        check_loop(
            self.curriculum,
            "the Trainer",
            max_steps=max_steps,
            fix=fix,
            accumulation=accumulation,
            world_size=args.world_size,
        )
        if not self.uses_data:
            return
        if args.per_device_train_batch_size != 1:
            raise ConfigError(
                f"per_device_train_batch_size is {args.per_device_train_batch_size}; RampupDataset serves whole "
                "constant-token batches: set it to 1 (and data_collator=dataset.collate)"
            )
        if args.dataloader_num_workers > 0:
            raise ConfigError(
                f"dataloader_num_workers is {args.dataloader_num_workers}; the RampupDataset's state is kept "
                "in the main process (worker processes would each serve the schedule): set it to 0"
            )
        if not args.ignore_data_skip:
            raise ConfigError(
                "ignore_data_skip is False: on resume the Trainer would skip the batches already trained, "
                "which the RampupDataset's saved state already skips; set TrainingArguments(ignore_data_skip=True)"
            )
        if args.remove_unused_columns:
            raise ConfigError(
                "remove_unused_columns is True: the Trainer would drop the batches' shift_labels (not an argument "
                "of the model's forward) and the model would shift the already-shifted labels again, training "
                "on the token after next; set TrainingArguments(remove_unused_columns=False)"
            )

    def _check_loader(self, train_dataloader: Any) -> None:
        dataset = self.curriculum.dataset()
        found = getattr(train_dataloader, "dataset", None)
        if found is not dataset:
            raise ConfigError(
                f"the Trainer's train dataset is {type(found).__name__}, not this curriculum's RampupDataset "
                "(a customised dataset or sampler would ignore the schedule's batch shapes); pass "
                "train_dataset=curriculum.dataset() and data_collator=curriculum.dataset().collate"
            )

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):  # type: ignore[no-untyped-def]
        self._check_args(args, state.max_steps)
        if self.uses_data:
            self._check_loader(train_dataloader)
        self.curriculum.bind(model, optimizer, set(self.attributes))
        if state.global_step > 0 and self.uses_data:
            self._restore(Path(args.output_dir), state.global_step)

    def _restore(self, output_dir: Path, step: int) -> None:
        folder = output_dir / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{step}"
        path = folder / STATE_FILE
        if not path.is_file():
            raise ConfigError(
                f"resuming at step {step}, but {path} does not exist: the checkpoint was written without "
                "RampupCallback, or resume_from_checkpoint is outside args.output_dir; resume from a checkpoint "
                "folder this run wrote in its output_dir"
            )
        self.curriculum.dataset().load_state_dict(json.loads(path.read_text()))

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        step = state.global_step
        length = self.curriculum.dataset().lengths.get(step) if self.uses_data else None
        knobs = self.curriculum.apply(step, length)
        if self.attributes:
            root = {"trainer": self.trainer, "args": args, "model": kwargs.get("model")}
            if self.trainer is None:
                del root["trainer"]
            for knob, paths in self.attributes.items():
                for path in paths:
                    obj, name = _resolve(root, path)
                    _write(obj, name, knobs[knob], path)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if optimizer is None:
            return
        self._lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * self.curriculum.lr_factor(g)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if optimizer is not None and self._lrs:  # the Trainer's scheduler keeps its own lr, unscaled
            for g, lr in zip(optimizer.param_groups, self._lrs, strict=True):
                g["lr"] = lr
        self._lrs = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs is not None and "loss" in logs:  # a training log line: the knobs of the step just trained
            logs.update(self.curriculum.log_values(max(0, state.global_step - 1)))

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not self.uses_data or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            saved = self.curriculum.dataset().state_dict(consumed=state.global_step)
            tmp = folder / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(saved))
            tmp.replace(folder / STATE_FILE)
