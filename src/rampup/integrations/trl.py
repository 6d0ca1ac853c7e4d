"""rampup inside TRL's GRPOTrainer: a completion budget that follows the schedule (:class:`CompletionBudget`).

"Train Long, Think Short": the most tokens a generated completion may take decays over GRPO training. The
schedule ramps the ``completion_budget`` knob; TRL copies ``max_completion_length`` into its generation
config when the trainer is built, so the callback is bound to the trainer (``CompletionBudget(cur).bind(
trainer)``) and, before every optimizer step, writes the step's budget into the trainer's
``max_completion_length``, its ``generation_config.max_new_tokens`` and its ``generation_kwargs``. Any other
knob of the schedule applies as in :class:`~rampup.integrations.transformers.RampupCallback`.

Needs the ``trl`` extra (``pip install 'rampup[trl]'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import trl

from rampup.errors import ConfigError
from rampup.integrations.curriculum import Curriculum
from rampup.integrations.transformers import RampupCallback

__all__ = ["BUDGET_PATHS", "CompletionBudget"]

BUDGET_PATHS = (
    "trainer.max_completion_length",
    "trainer.generation_config.max_new_tokens",
    "trainer.generation_kwargs.max_new_tokens",
)
"""Where a GRPOTrainer keeps the completion budget its next generation uses."""


class CompletionBudget(RampupCallback):
    """:class:`~rampup.integrations.transformers.RampupCallback` with ``completion_budget`` bound to a
    ``trl.GRPOTrainer``'s generation budget. ``attributes`` adds bindings of other scalar knobs."""

    def __init__(self, curriculum: Curriculum, *, attributes: Mapping[str, str | Sequence[str]] | None = None):
        if "completion_budget" not in curriculum.set_knobs():
            raise ConfigError(
                "the schedule never sets completion_budget; ramp it, e.g. stages: [{duration: 100%, "
                "completion_budget: {from: 256, to: 64}}]"
            )
        super().__init__(curriculum, attributes={"completion_budget": list(BUDGET_PATHS), **(attributes or {})})

    def bind(self, trainer: Any) -> CompletionBudget:
        """Attach to a ``trl.GRPOTrainer`` built with the default generation path (not vLLM, whose engine
        takes its budget once), whose ``max_completion_length`` is at least the schedule's largest budget."""
        if not isinstance(trainer, trl.GRPOTrainer):
            raise ConfigError(f"CompletionBudget drives a trl.GRPOTrainer, got {type(trainer).__name__}")
        config = cast(trl.GRPOConfig, trainer.args)
        if config.use_vllm:
            raise ConfigError(
                "GRPOConfig(use_vllm=True): the vLLM engine takes its completion budget once, when it starts; "
                "generate with transformers (use_vllm=False) for a scheduled budget"
            )
        top = max(p.knobs["completion_budget"] for p in self.curriculum.plans)
        if config.max_completion_length < top:
            raise ConfigError(
                f"the schedule's completion_budget reaches {top} but GRPOConfig.max_completion_length is "
                f"{config.max_completion_length}; set max_completion_length={top} (the largest budget)"
            )
        super().bind(trainer)
        return self
