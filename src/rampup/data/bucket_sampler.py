"""The bucket sampler: each optimizer step draws one length bucket and serves a whole batch from it.

A step of b tokens from bucket k holds b / 2^k sequences of 2^k tokens (rampup.data.buckets): constant
tokens per step, no padding, no cross-document attention. The draw is Algorithm 1 of Dataset
Decomposition (Pouransari et al. 2024): each bucket's sequences are split into ``cycles``, and within a
cycle bucket k is drawn with probability proportional to its odds (knob ``bucket_odds``) among the
buckets with a whole batch left. The cycles span the run, not the corpus (each bucket gives the same
fraction of its sequences); within an epoch a sequence is served at most once, and running dry is
refused at plan time unless ``data.buckets.repeat``.

:class:`BucketCurriculum` is the bookkeeping alone (no token reads), so ``rampup plan`` walks a run
exactly as the sampler will. See docs/curricula.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rampup.data.buckets import BucketSet
from rampup.data.dataset import check_sampler_state
from rampup.errors import ConfigError, DataError, did_you_mean

if TYPE_CHECKING:
    from rampup.schedule import Schedule, StepPlan


def check_context(seq_len: int, min_log2: int, max_log2: int) -> None:
    """The schedule's seq_len of a bucket run is its target context: the longest bucket."""
    if seq_len != 1 << max_log2:
        raise ConfigError(
            f"data.sampler: buckets serves sequences of {1 << min_log2}..{1 << max_log2} tokens, "
            f"so the schedule's seq_len must be the longest bucket, {1 << max_log2}; got "
            f"{seq_len}: set seq_len: {1 << max_log2} or data.buckets.max_log2 to log2 of "
            "your target context"
        )


BUCKET_ODDS_PRESETS = ("uniform", "grow-linear", "grow-p2", "shrink-linear", "shrink-p2")
"""Named odds over length buckets, shortest bucket first (Dataset Decomposition, Pouransari et al. 2024):
grow-* favour short buckets (6,5,4,... or 32,16,8,...), so each cycle grows from short to long;
shrink-* are the reverse."""


def _check_bucket_odds(value: Any) -> Any:  # noqa: C901
    if isinstance(value, str):
        if value not in BUCKET_ODDS_PRESETS:
            raise ValueError(
                f"bucket_odds '{value}' is not a preset{did_you_mean(value, BUCKET_ODDS_PRESETS)}; "
                f"use one of {', '.join(BUCKET_ODDS_PRESETS)} or a list of numbers, one per bucket"
            )
        return value
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        if any(v < 0 for v in value) or not any(v > 0 for v in value):
            raise ValueError(f"bucket_odds {list(value)} must be >= 0 with at least one > 0")
        return [float(v) for v in value]
    raise ValueError(
        f"bucket_odds takes a preset ({', '.join(BUCKET_ODDS_PRESETS)}) or a list of "
        f"numbers (one per bucket, shortest first), got {value!r}"
    )


def bucket_odds_weights(odds: Any, n_buckets: int) -> np.ndarray:
    """(n_buckets,) float odds, shortest bucket first, for a preset name or an explicit list."""
    odds = _check_bucket_odds(odds)
    i = np.arange(n_buckets, dtype=np.float64)
    if isinstance(odds, list):
        if len(odds) != n_buckets:
            raise ConfigError(
                f"bucket_odds has {len(odds)} values but there are {n_buckets} buckets "
                "(data.buckets.min_log2..max_log2); give one value per bucket, shortest first"
            )
        return np.array(odds, dtype=np.float64)
    return {
        "uniform": np.ones(n_buckets),
        "grow-linear": n_buckets - i,
        "grow-p2": 2.0 ** (n_buckets - 1 - i),
        "shrink-linear": i + 1,
        "shrink-p2": 2.0**i,
    }[odds]


class BucketCurriculum:
    """Which bucket each step draws (Algorithm 1 with cycles); a few integers of resumable state."""

    def __init__(self, counts: dict[int, int], *, seed: int, cycles: int, run_tokens: int, repeat: bool = False):
        if cycles < 1:
            raise ConfigError(f"data.buckets.cycles must be >= 1, got {cycles}")
        self.ks = sorted(counts)
        self.counts = np.array([counts[k] for k in self.ks], dtype=np.int64)  # (n_buckets,)
        self.seed, self.cycles, self.repeat = seed, cycles, repeat
        available = int(sum(int(n) << k for k, n in zip(self.ks, self.counts, strict=True)))
        if available == 0:
            raise DataError(
                f"the buckets {1 << self.ks[0]}..{1 << self.ks[-1]} are empty: no "
                "document is long enough; lower data.buckets.min_log2 or use a larger corpus"
            )
        if run_tokens > available and not repeat:
            raise DataError(
                f"the run needs {run_tokens:,} tokens but buckets {1 << self.ks[0]}..{1 << self.ks[-1]} "
                f"hold {available:,}; shorten train.duration, widen the bucket range (data.buckets."
                "min_log2/max_log2), use more data, or set data.buckets.repeat: true to serve "
                "them again in a new epoch"
            )
        self.available_tokens = available
        self.run_tokens = run_tokens
        # Each bucket contributes this fraction of its sequences to the run's cycles.
        self.fraction = min(1.0, run_tokens / available)
        self.epoch = 0
        self.cycle = 0
        self.used = np.zeros(len(self.ks), dtype=np.int64)  # sequences served this epoch, per bucket
        self.draws = 0

    def _allowed(self) -> np.ndarray:
        """Sequences each bucket may still serve in the current cycle (the last cycle: all that is left)."""
        if self.cycle >= self.cycles:
            return self.counts - self.used
        quota = np.floor(self.counts * self.fraction * (self.cycle + 1) / self.cycles).astype(np.int64)
        return np.minimum(quota, self.counts) - self.used

    def choose(self, batch_tokens: int, odds: Any, mask: np.ndarray | None = None) -> tuple[int, int, int]:
        """(k, first sequence index in this epoch's order of bucket k, number of sequences); ``mask``
        (bool per bucket) leaves out buckets that cannot serve this step for another reason (a mixture's
        source short of sequences)."""
        if batch_tokens % (1 << self.ks[-1]):
            raise ConfigError(
                f"batch_tokens {batch_tokens} is not divisible by the longest bucket's "
                f"length {1 << self.ks[-1]}; make it a multiple of {1 << self.ks[-1]}"
            )
        weights = bucket_odds_weights(odds, len(self.ks))
        need = np.array([batch_tokens >> k for k in self.ks], dtype=np.int64)  # sequences per batch
        while True:
            ok = (self._allowed() >= need) & (self.counts - self.used >= need) & (weights > 0)
            if mask is not None:
                ok &= mask
            if ok.any():
                p = np.where(ok, weights, 0.0)
                rng = np.random.default_rng([self.seed, self.epoch, self.draws])
                i = int(rng.choice(len(self.ks), p=p / p.sum()))
                first = int(self.used[i])
                self.used[i] += need[i]
                self.draws += 1
                return self.ks[i], first, int(need[i])
            if self.cycle < self.cycles:  # the last "cycle" (index == cycles) takes any leftovers
                self.cycle += 1
                continue
            if not self.used.any():  # a whole fresh epoch cannot serve this step
                raise DataError(
                    f"no bucket with non-zero odds holds a whole batch of {batch_tokens} "
                    f"tokens (sequences per bucket: {dict(zip(self.ks, self.counts.tolist(), strict=True))}); "
                    "lower batch_tokens or give the bucket odds to fuller buckets"
                )
            if not self.repeat:
                raise DataError(
                    f"the length buckets ran dry after {self.draws} steps of epoch {self.epoch}: "
                    f"{self.available_tokens:,} tokens in buckets {1 << self.ks[0]}..{1 << self.ks[-1]} "
                    f"(used per bucket {dict(zip(self.ks, self.used.tolist(), strict=True))}) cannot fill the run "
                    f"of {self.run_tokens:,} tokens with these odds; shorten train.duration, widen the "
                    "bucket range, or set data.buckets.repeat: true to start a new epoch of the buckets"
                )
            self.epoch, self.cycle, self.draws = self.epoch + 1, 0, 0
            self.used[:] = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cycle": self.cycle,
            "used": self.used.tolist(),
            "draws": self.draws,
            "counts": self.counts.tolist(),
            "ks": self.ks,
            "cycles": self.cycles,
            "run_tokens": self.run_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (state["ks"], state["counts"], state["cycles"], state["run_tokens"])
        if saved != (self.ks, self.counts.tolist(), self.cycles, self.run_tokens):
            raise ConfigError(
                "the sampler state was saved for other buckets, cycles or run length; "
                "resume with the data and schedule the run was started with"
            )
        self.epoch, self.cycle, self.draws = int(state["epoch"]), int(state["cycle"]), int(state["draws"])
        self.used = np.array(state["used"], dtype=np.int64)


class BucketSampler:
    """Whole batches from one length bucket per step; see the module docstring."""

    kind = "buckets"

    def __init__(self, buckets: BucketSet, seed: int, *, cycles: int, run_tokens: int, repeat: bool = False):
        self.buckets = buckets
        self.dataset = buckets.dataset
        self.seed = seed
        self.curriculum = BucketCurriculum(
            buckets.counts(), seed=seed, cycles=cycles, run_tokens=run_tokens, repeat=repeat
        )
        self.tokens_served = 0
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.curriculum.epoch

    def _order(self, epoch: int, k: int) -> np.ndarray:
        if (epoch, k) not in self._perm:
            self._perm = {key: v for key, v in self._perm.items() if key[0] == epoch}
            n = len(self.buckets.starts[k])
            self._perm[epoch, k] = np.random.default_rng([self.seed, epoch, 1, k]).permutation(n)
        return self._perm[epoch, k]

    def next_batch_tokens(self, batch_tokens: int, odds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_tokens / 2^k, 2^k) int64, from the bucket k this step draws."""
        k, first, n = self.curriculum.choose(batch_tokens, odds)
        idx = self._order(self.curriculum.epoch, k)[first : first + n]
        t = torch.from_numpy(self.buckets.rows(k, idx))  # (n, 2^k + 1)
        self.tokens_served += n << k
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def take(self, sp: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch_tokens(sp.knobs["batch_tokens"], sp.knobs["bucket_odds"])

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "tokens_served": self.tokens_served,
            "n_docs": self.dataset.n_docs,
            "n_tokens": self.dataset.n_tokens,
            "data_id": self.dataset.identity,
            "curriculum": self.curriculum.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        check_sampler_state(state, self.kind, self.dataset)
        self.seed = int(state["seed"])
        self.curriculum.seed = self.seed
        self.curriculum.load_state_dict(state["curriculum"])
        self.tokens_served = int(state["tokens_served"])
        self._perm = {}


def plan_buckets(
    counts: dict[int, int], schedule: Schedule, *, seed: int, cycles: int, repeat: bool = False
) -> list[int]:
    """The bucket k every step of ``schedule`` will draw, walked dry (no token reads) exactly as the
    sampler will; raises at plan time what the run would hit (buckets running dry, bad odds)."""
    cur = BucketCurriculum(counts, seed=seed, cycles=cycles, run_tokens=schedule.total_tokens, repeat=repeat)
    return [cur.choose(sp.knobs["batch_tokens"], sp.knobs["bucket_odds"])[0] for sp in schedule.steps()]
