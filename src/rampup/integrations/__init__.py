"""Bridges to the training loops people already use. :mod:`rampup.integrations.curriculum` (no extra
dependency): a run config's schedule, data and knob effects for another loop. The bridges, each an
optional extra that the core never imports: :mod:`rampup.integrations.transformers` (Hugging Face
``Trainer``, and so TRL's trainers), :mod:`rampup.integrations.trl` (a completion budget for
``GRPOTrainer``), :mod:`rampup.integrations.lightning` (``lightning.Trainer``)."""
