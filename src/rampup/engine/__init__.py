"""The engine: a :class:`Trainer` whose loop reads in one screen, the step functions for a loop of your own,
the data seam, state, evaluation, records, checkpoints, precision, optimizer and distributed setup. It calls
knob families through their hooks (rampup.schedule.registry) and never names one."""
