"""The library's own error types, and the exit codes of ``rampup``.

Every problem a user can cause (a bad config, a missing file, a corrupt shard) is raised as a subclass
of :class:`RampupError` whose message names the problem and the fix; the CLI prints it without a
traceback and exits with its ``exit_code``. Anything else is a bug in rampup. See docs/reliability.md.

====  =======================================================================================
0     finished
2     a bad config, corpus, shard or checkpoint (:class:`RampupError`); nothing was trained
3     training stopped on non-finite numbers (:class:`NonFiniteError`); the last checkpoint is good
4     a checkpoint or the run's record could not be written (:class:`CheckpointWriteError`,
      :class:`RecordWriteError`); the checkpoints are intact
5     a second Ctrl-C stopped training at once; the last checkpoint is untouched
128+N stopped by signal N (143 SIGTERM, 130 SIGINT) after writing a checkpoint of the current step
====  =======================================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_ERROR = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT_WRITE = 4
EXIT_ABORTED = 5


class RampupError(Exception):
    """Base class of every user-facing rampup error."""

    exit_code: int = EXIT_ERROR


class ConfigError(RampupError, ValueError):
    """A configuration value, key or combination that cannot be honoured."""


class DurationError(ConfigError):
    """A duration string without a valid unit, or a conversion that lacks what it needs."""


class DataError(RampupError):
    """A missing, empty or corrupt corpus, shard or tokenizer."""


class CheckpointError(RampupError):
    """A missing or unreadable checkpoint."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are missing, cut short or differ from its manifest's checksums."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, file too large, permission); the previous one is intact."""

    exit_code = EXIT_CHECKPOINT_WRITE


class RecordWriteError(RampupError):
    """The run's record (metrics.jsonl, summary) could not be written; its checkpoints are untouched."""

    exit_code = EXIT_CHECKPOINT_WRITE


class DistributedError(RampupError):
    """A collective with the other ranks of a torchrun job failed or timed out (a rank hung or died)."""


class NonFiniteError(RampupError):
    """Training met non-finite numbers it was configured not to survive (train.nonfinite)."""

    exit_code = EXIT_NONFINITE


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Interrupted(RampupError):
    """Training stopped by a signal after writing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
