"""The ``mix`` knob: the weight of each source of a data mixture (``data.sources``), per stage, constant
or ramping (the sampler that reads it each step: rampup.data.mixture). See docs/mixtures.md."""

from __future__ import annotations

from typing import Any

from rampup.errors import did_you_mean
from rampup.protocols import RunSettings
from rampup.schedule.ramps import evaluate_mapping, ramped_mapping
from rampup.schedule.registry import Family, Knob, KnobContext, knob_keys_set, register_family, register_knob


def check_mix(value: Any) -> dict[str, Any]:
    """{source: weight}, each weight a number >= 0 or a ramp across the stage ({from: 1.0, to: 0.4})."""
    if value is None or value == {}:
        return {}
    out = ramped_mapping(value, "mix", "weight", "{code: 0.6, books: 0.4}")
    ends = [evaluate_mapping(out, p) for p in (0.0, 1.0)]
    if any(not sum(e.values()) > 0 for e in ends):  # ramps are monotone: zero inside a stage means zero at an end
        raise ValueError(f"mix {value!r}: the weights are all zero at the start or end of the stage; one must be > 0")
    return out


def _check_config(cfg: RunSettings) -> None:
    """mix needs data.sources and may name only them; several sources without a mix mix by size."""
    if "mix" not in knob_keys_set(cfg.schedule):
        return
    sources = getattr(cfg.data, "sources", None)
    if sources is None:
        raise ValueError(
            "the schedule sets mix, which weighs the sources of data.sources; define data.sources "
            "({name: {source: ...}}) or remove mix"
        )
    values = [cfg.schedule.knobs.get("mix")] + [st.knobs.get("mix") for st in cfg.schedule.stages]
    for v in values:
        for name in v or {}:
            if name not in sources:
                raise ValueError(
                    f"mix names the source '{name}'{did_you_mean(name, sources)}, which data.sources does not "
                    f"define; sources: {', '.join(sources)}"
                )


register_knob(
    Knob(
        "mix",
        "Weight of each source of data.sources in every step's rows ({name: weight}, each constant or a ramp; "
        "a source left out weighs 0). Unset ({}): in proportion to the sources' training tokens.",
        default={},
        rampable=False,
        check=check_mix,
        evaluate_value=evaluate_mapping,
        check_config=_check_config,
        model_free=True,
    )
)


class MixFamily(Family):
    """Records the tokens each source gave to every step (metrics.jsonl ``{"event": "mix"}``)."""

    name = "mix"

    def events(self, ctx: KnobContext) -> list[dict[str, Any]]:
        sampler = ctx.sampler
        last = getattr(sampler, "last", None) if getattr(sampler, "kind", None) == "mixture" else None
        if not last:
            return []
        return [{"event": "mix", "step": ctx.step + 1, "tokens": dict(last)}]


register_family(MixFamily())
