"""The shape family: ``seq_len`` (tokens per training sequence) and ``batch_tokens`` (tokens per optimizer
step), with the checks that every stage's length fits the model's positions and the sampler."""

from __future__ import annotations

import math
from typing import Any

from rampup.schedule.ramps import Ramp
from rampup.schedule.registry import Knob, register_knob


def _top(v: Any) -> float | None:
    return max(v.start, v.to) if isinstance(v, Ramp) else v


def _check_seq_len_limit(cfg: Any) -> None:
    """Every stage's seq_len within the model's positions. A Hugging Face model without model.max_seq_len
    set may go past its folder's limit where the stage's rope (pi, ntk, yarn; inherited from earlier
    stages) covers the length, factor x original; model.max_seq_len then becomes the longest such length
    (what evaluation may score and what an export declares)."""
    m = cfg.model
    limit, longest = m.max_seq_len, m.max_seq_len
    rope, seq = cfg.schedule.knobs.get("rope"), cfg.schedule.knobs.get("seq_len")
    for i, st in enumerate([None, *cfg.schedule.stages]):
        where = "schedule.knobs.seq_len" if st is None else f"schedule.stages.{i - 1}.seq_len"
        if st is not None:
            rope, seq = st.knobs.get("rope", rope), st.knobs.get("seq_len", seq)
        top = _top(seq)
        if top is None or top <= limit:
            continue
        covers = (
            m.extendable
            and rope is not None
            and rope.method in ("pi", "ntk", "yarn")
            and rope.factor * (rope.original_max_len or m.native_positions) >= top
        )
        if covers:
            longest = max(longest, int(top))
        elif m.source != "hf":
            raise ValueError(
                f"{where} reaches {top:g} but model.max_seq_len is {limit}; "
                "raise model.max_seq_len or shorten the stage"
            )
        else:
            native = m.native_positions or limit
            raise ValueError(
                f"{where} reaches {top:g} but this Hugging Face model takes {limit} positions"
                + (
                    " (model.max_seq_len)"
                    if not m.extendable
                    else f" (max_position_embeddings of {m.path})"
                    if m.path
                    else " (its max_position_embeddings)"
                )
                + f"; give the stage a rope that covers it, e.g. rope: {{method: yarn, factor: "
                f"{math.ceil(top / native)}, original_max_len: {native}}} (factor x original >= {top:g}), "
                "or set model.max_seq_len to train past the limit with any rope"
            )
    if longest > limit:
        m.__dict__["max_seq_len"] = longest


def _check_one_length(cfg: Any) -> None:
    if cfg.data.sampler in ("fixed", "buckets"):
        start = cfg.schedule.knobs.get("seq_len")
        lens = {st.knobs["seq_len"] for st in cfg.schedule.stages if "seq_len" in st.knobs}
        ramps = [x for x in lens if isinstance(x, Ramp)]
        if ramps or len(lens | ({start} if start else set())) > 1:
            raise ValueError(
                f"data.sampler '{cfg.data.sampler}' needs one constant seq_len (the "
                "longest context), but the schedule changes seq_len; use data.sampler: staged "
                "for a seq_len curriculum"
            )


def _check_seq_len(cfg: Any) -> None:
    problems = []
    for check in (_check_seq_len_limit, _check_one_length):
        try:
            check(cfg)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("\n  ".join(problems))


register_knob(
    Knob(
        "seq_len",
        "Tokens per training sequence (context length).",
        integer=True,
        minimum=1,
        check_config=_check_seq_len,
    )
)
register_knob(
    Knob("batch_tokens", "Tokens per optimizer step (rounded down to whole sequences).", integer=True, minimum=1)
)
