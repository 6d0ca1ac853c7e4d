"""The ``bucket_odds`` knob: the odds of drawing each length bucket of a dataset-decomposition run (the
sampler that reads them each step: rampup.data.bucket_sampler)."""

from __future__ import annotations

from rampup.data.bucket_sampler import BUCKET_ODDS_PRESETS, _check_bucket_odds
from rampup.protocols import RunSettings
from rampup.schedule.registry import Knob, knob_keys_set, register_knob


def _only_for_buckets(cfg: RunSettings) -> None:
    if "bucket_odds" in knob_keys_set(cfg.schedule) and cfg.data.sampler != "buckets":
        raise ValueError(
            "the schedule sets bucket_odds, which only the buckets sampler uses; set "
            "data.sampler: buckets or remove bucket_odds"
        )


# no apply: the bucket sampler reads the odds of each step itself (BucketSampler.take)
register_knob(
    Knob(
        "bucket_odds",
        "Odds of drawing each length bucket (data.sampler: buckets): "
        f"{', '.join(BUCKET_ODDS_PRESETS)}, or a list, shortest bucket first.",
        default="uniform",
        rampable=False,
        check=_check_bucket_odds,
        check_config=_only_for_buckets,
    )
)
