"""The library's own error types.

Every problem a user can cause (a bad config, a missing file, a corrupt shard) is raised as a
subclass of :class:`RampupError` whose message names the problem and the fix. The CLI prints these
without a traceback; anything else is a bug in rampup.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class RampupError(Exception):
    """Base class of every user-facing rampup error."""


class ConfigError(RampupError, ValueError):
    """A configuration value, key or combination that cannot be honoured."""


class DurationError(ConfigError):
    """A duration string without a valid unit, or a conversion that lacks what it needs."""


class DataError(RampupError):
    """A missing, empty or corrupt corpus, shard or tokenizer."""


class CheckpointError(RampupError):
    """A missing or unreadable checkpoint."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
