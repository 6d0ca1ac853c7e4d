"""rampup inside ``lightning.Trainer``: :class:`RampupCallback`.

The curriculum's :class:`~rampup.integrations.curriculum.RampupDataset` is the run's training data,
``trainer.fit(module, train_dataloaders=curriculum.dataset().loader())``, so ``seq_len`` warmup, buckets
and mixtures shape the batches. Before every training batch the callback sets that step's knobs on the
module's model (RoPE at a stage boundary, freezing, lr groups), scales each parameter group's learning
rate by the step's ``lr_mult`` around the optimizer's own step (the scheduler keeps its unscaled values),
logs the knob values through ``LightningModule.log`` and keeps the dataset's state in Lightning's
checkpoint (the callback's ``state_dict``), so ``trainer.fit(..., ckpt_path=...)`` resumes exactly.

Needs the ``lightning`` extra (``pip install 'rampup[lightning]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.hooks import RemovableHandle

from rampup.errors import ConfigError
from rampup.integrations.curriculum import Curriculum, check_loop

__all__ = ["RampupCallback"]

HOST = "a Lightning Trainer"


class RampupCallback(pl.Callback):
    """Applies a :class:`~rampup.integrations.curriculum.Curriculum` inside a ``lightning.Trainer``.

    ``model_attr`` names the LightningModule's attribute holding the causal LM the knobs act on
    (``"model"``; ``None``: the LightningModule itself). Knobs this loop cannot apply (growth,
    distillation, ...) are refused here, before any step.
    """

    def __init__(self, curriculum: Curriculum, *, model_attr: str | None = "model"):
        self.curriculum = curriculum
        self.model_attr = model_attr
        curriculum.check_host(HOST, set())
        self.trainer: pl.Trainer | None = None
        self._hooks: list[RemovableHandle] = []
        self._lrs: list[float] = []

    @property
    def uses_data(self) -> bool:
        return self.curriculum.data is not None

    @property
    def state_key(self) -> str:
        return "RampupCallback"

    # ------------------------------------------------------------------ checks, before any step
    def _check(self, trainer: pl.Trainer) -> None:
        accumulation = ("accumulate_grad_batches", trainer.accumulate_grad_batches)
        fix = "lightning.Trainer(max_steps={n})"
        check_loop(
            self.curriculum,
            "the Trainer",
            max_steps=trainer.max_steps,
            fix=fix,
            accumulation=accumulation,
            world_size=trainer.world_size,
        )
        if not self.uses_data:
            return
        loader = trainer.train_dataloader
        found = getattr(loader, "dataset", None)
        if found is not self.curriculum.dataset():
            raise ConfigError(
                f"the Trainer's train dataloader serves {type(found).__name__}, not this curriculum's RampupDataset "
                "(a customised dataset or sampler would ignore the schedule's batch shapes); pass "
                "train_dataloaders=curriculum.dataset().loader()"
            )
        workers = getattr(loader, "num_workers", 0)
        if workers > 0:
            raise ConfigError(
                f"the train dataloader has num_workers={workers}; the RampupDataset's state is kept in "
                "the main process: use curriculum.dataset().loader()"
            )

    def _model(self, pl_module: pl.LightningModule) -> Any:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"{type(pl_module).__name__} has no module at attribute '{self.model_attr}'; pass "
                "RampupCallback(curriculum, model_attr=NAME) with the attribute holding the causal LM"
            )
        return model

    # ------------------------------------------------------------------ events
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)
        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"RampupCallback takes one optimizer; configure_optimizers gave {len(trainer.optimizers)}"
            )
        optimizer = trainer.optimizers[0]
        self.curriculum.bind(self._model(pl_module), optimizer)
        self._hooks = [optimizer.register_step_pre_hook(self._scale), optimizer.register_step_post_hook(self._restore)]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        length = int(batch["input_ids"].shape[-1]) if self.uses_data and isinstance(batch, Mapping) else None
        self.curriculum.apply(trainer.global_step, length)
        values = self.curriculum.log_values(trainer.global_step)
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    def _scale(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * self.curriculum.lr_factor(g)

    def _restore(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for g, lr in zip(optimizer.param_groups, self._lrs, strict=True):
            g["lr"] = lr
        self._lrs = []

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if not self.uses_data or self.trainer is None:
            return {}
        return self.curriculum.dataset().state_dict(consumed=self.trainer.global_step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.uses_data:
            if not state_dict:
                raise ConfigError(
                    "the checkpoint holds no RampupDataset state: it was written without RampupCallback or with a "
                    "schedule without data; resume from a checkpoint this run wrote"
                )
            self.curriculum.dataset().load_state_dict(state_dict)
