"""Compare finished runs: time, tokens and FLOPs to reach a target validation loss.

Runs whose configs differ only in ``train.seed``, ``train.out_dir`` and ``name`` are seeds of one group,
reported as median and (min, max). The target is ``target_loss`` or the baseline group's upper-median
final loss (so at least half its seeds reach it). Time to target is read at the FIRST evaluation at or
below it, without interpolation (an upper bound); a target never reached is ``None``, never a number.
Compile steps count as compile time, not train time; runs at different resolved precisions are flagged.

Example (CPU, after two runs have finished)::

    from rampup.tools.compare import compare_runs, print_comparison
    from rich.console import Console
    print_comparison(compare_runs(["runs/ramp", "runs/baseline"]), Console())

See docs/measuring.md.
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from rampup.config import load_config
from rampup.engine.records import read_metrics, select_eval_set
from rampup.engine.trainer import train
from rampup.errors import ConfigError, DataError
from rampup.units import format_tokens

# Keys of the data section that do not change which tokens are trained on or evaluated.
METRICS = ("loss", "error")
"""What compare measures time to: validation loss, or a classifier's error rate (1 - accuracy)."""
_DATA_KEYS_IGNORED = ("cache_dir", "shard_tokens", "sampler")
_SEED_SUFFIX = re.compile(r"(_seed\d+|-s\d+)$")


@dataclass
class Run:
    """One finished (or crashed) run folder, read back from disk."""

    name: str
    path: Path
    config: dict[str, Any]
    evals: dict[int, list[tuple[int, float, float, float, float]]]
    """seq_len -> [(tokens, train_time, flops, loss, compile_time)] in the order evaluated."""
    steps: list[dict[str, Any]] = field(default_factory=list)
    final: dict[int, float] = field(default_factory=dict)
    """seq_len -> loss of the last evaluation at that length."""
    seed: int = 0
    precision: str = ""
    """The resolved autocast precision the run trained at (bf16, fp32; "" if not recorded)."""
    group_key: str = ""
    """The config without name, train.seed and train.out_dir: runs with equal keys are seeds of one group."""


def _group_key(config: dict[str, Any]) -> str:
    c = copy.deepcopy(config)
    c.pop("name", None)
    train = c.get("train") or {}
    train.pop("seed", None)
    train.pop("out_dir", None)
    return json.dumps(c, sort_keys=True, default=str)


def load_run(run_dir: str | Path, on: str | None = None, metric: str = "loss") -> Run:
    """Read a run folder; a missing folder, config or evaluation is a :class:`DataError` naming the path.
    ``on``: the evaluations of that source of a mixture (data.sources) count as the run's. ``metric``:
    ``loss``, or ``error`` (1 - accuracy, a classifier's; lower is better like a loss)."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}'; compare on one of {', '.join(METRICS)}")
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(f"run folder {path} does not exist; give the out_dir of a finished run")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path} is missing; {path} is not a rampup run folder")
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{cfg_path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise DataError(f"{cfg_path} does not hold a run config")
    records = read_metrics(path / "metrics.jsonl")
    if not records:
        raise DataError(f"{path / 'metrics.jsonl'} is missing or empty; the run in {path} recorded no metrics")
    records = select_eval_set(records, on, path)
    evals: dict[int, list[tuple[int, float, float, float, float]]] = {}
    precision = ""
    for r in records:
        if r.get("event") == "eval":
            if metric == "error" and "accuracy" not in r:
                raise DataError(
                    f"the run in {path} recorded no accuracy (a classifier's evaluation records it); compare it "
                    "on loss instead"
                )
            evals.setdefault(int(r["seq_len"]), []).append(
                (
                    int(r["tokens"]),
                    float(r["train_time"]),
                    float(r["flops"]),
                    float(r["loss"]) if metric == "loss" else 1.0 - float(r["accuracy"]),
                    float(r.get("compile_time", 0.0)),
                )
            )
        elif r.get("event") == "run" and isinstance(r.get("precision"), dict):
            precision = str(r["precision"].get("precision", ""))
    if not evals:
        raise DataError(f"{path / 'metrics.jsonl'} has no evaluation; the run in {path} stopped before its first eval")
    return Run(
        name=str(config.get("name", path.name)),
        path=path,
        config=config,
        evals=evals,
        steps=[r for r in records if r.get("event") == "step"],
        final={n: e[-1][3] for n, e in evals.items()},
        seed=int((config.get("train") or {}).get("seed", 0)),
        precision=precision,
        group_key=_group_key(config),
    )


def time_to_target(evals: Sequence[tuple[float, ...]], target: float) -> dict[str, float] | None:
    """Tokens, train_time, compile_time, their sum (``time``) and FLOPs at the first evaluation with
    loss <= ``target``; None if never reached. Entries are (tokens, train_time, flops, loss[, compile_time]).

    No interpolation between evaluations: the result is an upper bound on when the target was crossed.
    """
    for tokens, train_time, flops, loss, *rest in evals:
        if loss <= target:
            compile_time = float(rest[0]) if rest else 0.0
            return {
                "tokens": tokens,
                "train_time": train_time,
                "compile_time": compile_time,
                "time": train_time + compile_time,
                "flops": flops,
            }
    return None


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max, counting None (not reached) as +inf; an infinite statistic comes back None."""
    xs = [math.inf if v is None else v for v in values]
    fin = lambda v: None if v is None or math.isinf(v) else v  # noqa: E731
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": fin(statistics.median(xs)), "min": fin(min(xs)), "max": fin(max(xs))}


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _label(runs: list[Run]) -> str:
    stripped = {_SEED_SUFFIX.sub("", r.name) for r in runs}
    return stripped.pop() if len(stripped) == 1 else runs[0].name


def _held_out(config: dict[str, Any], on: str) -> dict[str, Any]:
    """What a run's held-out data of source ``on`` depends on: the source, how it is split and tokenized (a
    tokenizer trained by rampup is named by the corpora it was trained on)."""
    d = dict(config.get("data") or {})
    sources = d.get("sources") or {"": {k: d.get(k) for k in ("source", "text_field", "split", "max_files")}}
    src = dict(sources.get(on) or next(iter(sources.values())))
    tok = dict(d.get("tokenizer") or {})
    if tok.get("path") is None:
        tok["trained_on"] = sorted(str(s.get("source")) for s in sources.values())
    return {
        "source": src.get("source"),
        "text_field": src.get("text_field", "text"),
        "split": src.get("split"),
        "max_files": src.get("max_files"),
        "tokenizer": tok,
        "val_fraction": d.get("val_fraction"),
        "on_undecodable": d.get("on_undecodable"),
    }


def _check_same_data(runs: list[Run], on: str | None = None) -> None:
    def data(r: Run) -> dict[str, Any]:
        if on is not None:
            return _held_out(r.config, on)
        d = dict(r.config.get("data") or {})
        for k in _DATA_KEYS_IGNORED:
            d.pop(k, None)
        return d

    ref = data(runs[0])
    differ = [r for r in runs[1:] if data(r) != ref]
    if differ:
        names = ", ".join(f"'{r.name}' ({r.path})" for r in differ)
        raise ConfigError(
            f"compared runs must share data; {names} differ from '{runs[0].name}' ({runs[0].path}) "
            "in the data section (source, tokenizer, val_fraction, max_files, ...), so their "
            "validation losses are not comparable"
            + ("" if on is not None else "; runs on data mixtures compare on one source's loss: --on SOURCE")
        )


def _baseline_key(runs: list[Run], labels: dict[str, str], baseline: str | None) -> str:
    """The group key of ``baseline`` (a run name, group label or run folder); default: the last run's group."""
    if baseline is None:
        return runs[-1].group_key
    matches = [
        r.group_key
        for r in runs
        if baseline in (r.name, labels[r.group_key]) or Path(baseline).resolve() == r.path.resolve()
    ]
    if not matches:
        known = sorted({r.name for r in runs} | set(labels.values()))
        raise ConfigError(f"baseline '{baseline}' is none of the compared runs; give one of {known} or a run folder")
    return matches[0]


def _precision_warning(precisions: dict[str, list[str]]) -> list[str]:
    """A warning when the groups trained at different resolved precisions (label -> precisions)."""
    if len({p for ps in precisions.values() for p in ps}) <= 1:
        return []
    listed = ", ".join(f"'{g}' {'/'.join(ps)}" for g, ps in precisions.items() if ps)
    return [
        f"the runs trained at different precisions ({listed}): their wall-clock differs for a reason that is "
        "not the curriculum; set the same train.precision (bf16 or fp32) in every run to compare time"
    ]


_AXES = ("tokens", "time", "train_time", "compile_time", "flops")


def _groups(runs: list[Run]) -> tuple[dict[str, list[Run]], dict[str, str]]:
    """Runs grouped by config (seeds together), and each group's unique label."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group_key, []).append(r)
    labels: dict[str, str] = {}
    for key, members in groups.items():
        label, i = _label(members), 2
        while label in labels.values():
            label, i = f"{_label(members)} ({i})", i + 1
        labels[key] = label
    return groups, labels


def _shared_lengths(runs: list[Run], warnings: list[str]) -> list[int]:
    all_lens = set().union(*(r.evals for r in runs))
    shared = sorted(set.intersection(*(set(r.evals) for r in runs)))
    dropped = sorted(all_lens - set(shared))
    if dropped:
        warnings.append(
            f"context lengths {dropped} are not evaluated by every run and are left out; compared: {shared}"
        )
    if not shared:
        raise ConfigError("the compared runs share no evaluated context length; set the same eval.seq_lens in each")
    return shared


def _per_length(members: list[Run], n: int, target: float) -> dict[str, Any]:
    """One group at one evaluation length: each seed's time to ``target`` and their spread."""
    seeds: list[dict[str, Any]] = []
    for r in sorted(members, key=lambda r: r.seed):
        hit = time_to_target(r.evals[n], target)
        seeds.append(
            {
                "run": r.name,
                "path": str(r.path),
                "seed": r.seed,
                "final_loss": r.final[n],
                "reached": hit is not None,
                **{k: (hit[k] if hit else None) for k in _AXES},
            }
        )
    return {
        "target": target,
        "final_loss": _spread([s["final_loss"] for s in seeds]),
        **{k: _spread([s[k] for s in seeds]) for k in _AXES},
        "seeds": seeds,
    }


def _with_speedups(d: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(d)
    for axis, name in (
        ("time", "speedup_wall"),
        ("train_time", "speedup_wall_excl_compile"),
        ("tokens", "speedup_tokens"),
        ("flops", "speedup_flops"),
    ):
        ref = base[axis]["median"]
        # the slowest seed gives the smallest speed-up
        d[name] = {
            "median": _ratio(ref, d[axis]["median"]),
            "min": _ratio(ref, d[axis]["max"]),
            "max": _ratio(ref, d[axis]["min"]),
        }
    return d


def _group_rows(
    groups: dict[str, list[Run]],
    labels: dict[str, str],
    base_key: str,
    shared: list[int],
    targets: dict[int, float],
    precisions: dict[str, list[str]],
) -> list[dict[str, Any]]:
    """Each group's numbers at every shared length against the baseline's, the baseline last."""
    base_lengths = {n: _per_length(groups[base_key], n, targets[n]) for n in shared}
    out: list[dict[str, Any]] = []
    for key, members in groups.items():
        lengths = {
            str(n): _with_speedups(
                base_lengths[n] if key == base_key else _per_length(members, n, targets[n]), base_lengths[n]
            )
            for n in shared
        }
        out.append(
            {
                "label": labels[key],
                "baseline": key == base_key,
                "precision": precisions[labels[key]],
                "runs": [r.name for r in members],
                "paths": [str(r.path) for r in members],
                "seeds": sorted(r.seed for r in members),
                "lengths": lengths,
            }
        )
    out.sort(key=lambda g: g["baseline"])  # baseline last, like the input convention
    return out


def compare_runs(
    run_dirs: Sequence[str | Path],
    *,
    baseline: str | None = None,
    target_loss: float | None = None,
    on: str | None = None,
    metric: str = "loss",
) -> dict[str, Any]:
    """Group runs by config (seeds together) and measure each group against the baseline group.

    ``baseline`` is a run name, group label or run folder; default: the group of the last run given.
    ``on``: compare on that source's validation loss (a mixture's data.sources; a one-corpus run's own
    corpus when it is the same source, split and tokenizer). Returns a JSON-ready dict (see
    :func:`write_comparison`).
    """
    if not run_dirs:
        raise ConfigError("compare needs at least one run folder")
    runs = [load_run(d, on, metric) for d in run_dirs]
    _check_same_data(runs, on)
    groups, labels = _groups(runs)
    base_key = _baseline_key(runs, labels, baseline)
    warnings: list[str] = []
    shared = _shared_lengths(runs, warnings)
    # median_high: with an even seed count the plain median lies between two seeds, so only half of
    # the baseline would reach it and its median time-to-target would be "not reached"
    targets = {
        n: target_loss if target_loss is not None else statistics.median_high(r.final[n] for r in groups[base_key])
        for n in shared
    }
    precisions = {labels[key]: sorted({r.precision for r in members if r.precision}) for key, members in groups.items()}
    warnings += _precision_warning(precisions)
    out_groups = _group_rows(groups, labels, base_key, shared, targets, precisions)
    return {
        "baseline": labels[base_key],
        "on": on,
        "metric": metric,
        "target_loss": target_loss,
        "targets": {str(n): t for n, t in targets.items()},
        "seq_lens": shared,
        "warnings": warnings,
        "groups": out_groups,
    }


# ----------------------------------------------------------------------------------------------
# Output


def _fmt_time(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _fmt_stat(st: dict[str, float | None], fmt: Callable[[float], str], n_seeds: int) -> str:
    show = lambda v: "not reached" if v is None else fmt(v)  # noqa: E731
    if st["median"] is None:
        return "not reached"
    text = show(st["median"])
    if n_seeds > 1:
        text += f" ({show(st['min'])}–{show(st['max'])})"
    return text


COLUMNS = (
    "group",
    "seeds",
    "eval len",
    "final loss",
    "time to target",
    "of which compile",
    "tokens to target",
    "FLOPs to target",
    "speed-up (wall)",
    "speed-up (wall, excl. compile)",
    "speed-up (tokens)",
    "speed-up (FLOPs)",
)


def comparison_table(result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """(title, headers, rows) of the comparison: the console table and the HTML report show the same."""
    targets = ", ".join(f"{t:.4f} @ {n}" for n, t in result["targets"].items())
    how = "given" if result["target_loss"] is not None else f"median final loss of '{result['baseline']}'"
    rows = []
    mixed = len({p for g in result["groups"] for p in g.get("precision") or []}) > 1
    for g in result["groups"]:
        k = len(g["seeds"])
        for i, (n, d) in enumerate(g["lengths"].items()):
            reached = sum(s["reached"] for s in d["seeds"])
            prec = "/".join(g.get("precision") or [])
            rows.append(
                [
                    (g["label"] + (" (baseline)" if g["baseline"] else "") + (f", {prec}" if prec and mixed else ""))
                    if i == 0
                    else "",
                    str(k) if i == 0 else "",
                    n,
                    _fmt_stat(d["final_loss"], lambda v: f"{v:.4f}", k),
                    _fmt_stat(d["time"], _fmt_time, k) + (f" [{reached}/{k} reached]" if 0 < reached < k else ""),
                    _fmt_stat(d["compile_time"], _fmt_time, k),
                    _fmt_stat(d["tokens"], format_tokens, k),
                    _fmt_stat(d["flops"], lambda v: f"{v:.3g}", k),
                    _fmt_stat(d["speedup_wall"], lambda v: f"{v:.2f}x", k),
                    _fmt_stat(d["speedup_wall_excl_compile"], lambda v: f"{v:.2f}x", k),
                    _fmt_stat(d["speedup_tokens"], lambda v: f"{v:.2f}x", k),
                    _fmt_stat(d["speedup_flops"], lambda v: f"{v:.2f}x", k),
                ]
            )
    return f"time to target loss ({targets}; {how}); median (min–max) over seeds", list(COLUMNS), rows


def print_comparison(result: dict[str, Any], console: Console) -> None:
    """A table: per group and context length, final loss, cost to reach the target, speed-ups."""
    for w in result["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    title, headers, rows = comparison_table(result)
    table = Table(title=title)
    for col in headers:
        table.add_column(col, justify="left" if col == "group" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def write_comparison(result: dict[str, Any], path: str | Path) -> Path:
    """Write the comparison as JSON (``compare.json``); unreached targets are null."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1) + "\n")
    return p


# ----------------------------------------------------------------------------------------------
# Train, then compare


def run_and_compare(
    config_paths: Sequence[str | Path],
    *,
    seeds: int,
    overrides: Sequence[str] = (),
    out_root: str | Path,
    console: Console,
    on: str | None = None,
) -> dict[str, Any]:
    """Train every config for ``seeds`` seeds (train.seed + i) under ``out_root``, then compare them.

    All configs are loaded and validated before any training, and must share ``train.duration``.
    The last config is the baseline. Writes ``out_root/compare.json`` and prints the table.
    """

    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    if not config_paths:
        raise ConfigError("run_and_compare needs at least one config")
    out_root = Path(out_root)
    cfgs = [load_config(p, list(overrides)) for p in config_paths]
    durations = {
        str(p): (str(c.train.duration) if c.train.duration is not None else None)
        for p, c in zip(config_paths, cfgs, strict=True)
    }
    if len(set(durations.values())) > 1:
        listed = ", ".join(f"{p}: {d}" for p, d in durations.items())
        raise ConfigError(f"compared configs must share train.duration, so they get the same budget; got {listed}")
    names = [c.name for c in cfgs]
    if len(set(names)) < len(names):
        raise ConfigError(f"compared configs need distinct names (their run folders are named after them); got {names}")

    run_dirs = []
    for cfg in cfgs:
        base_seed = cfg.train.seed
        for i in range(seeds):
            c = cfg.model_copy(deep=True)
            c.train.seed = base_seed + i
            c.train.out_dir = str(out_root / f"{cfg.name}_seed{i}")
            console.print(f"training '{cfg.name}' seed {c.train.seed} -> {c.train.out_dir}")
            train(c, display_mode="plain")
            run_dirs.append(c.resolved_out_dir())
    result = compare_runs(run_dirs, baseline=cfgs[-1].name, on=on)
    write_comparison(result, out_root / "compare.json")
    print_comparison(result, console)
    return result
