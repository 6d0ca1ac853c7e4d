"""Reports of finished runs: figures (PNG, matplotlib) and one self-contained HTML page.

``report_run(run_dir)`` reads ``metrics.jsonl`` (and ``summary.json`` when present) of one run and
writes ``report/report.html`` with the summary tables above the figures; ``report_runs`` overlays
several runs on the same axes for a comparison. matplotlib is imported inside the functions so that
importing rampup stays fast.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rampup.engine.records import read_metrics, select_eval_set
from rampup.errors import DataError
from rampup.units import format_tokens

Table = tuple[str, list[str], list[list[str]]]

FIGURES = (
    "loss_vs_tokens",
    "loss_vs_time",
    "loss_vs_flops",
    "knobs",
    "val_loss_by_length",
    "tokens_per_s_by_stage",
)

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# ----------------------------------------------------------------------------------------- data


def _events(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("event") == kind]


def _smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing moving average; the window is ~2% of the points (at least 1, at most 200)."""
    n = len(values)
    if window is None:
        window = max(1, min(200, n // 50))
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _final_evals(records: list[dict]) -> dict[int, dict]:
    """The last eval record per context length."""
    final: dict[int, dict] = {}
    for r in _events(records, "eval"):
        final[int(r["seq_len"])] = r
    return final


def _stage_tok_per_s(records: list[dict]) -> dict[str, float]:
    """Median tokens/s per stage name, in stage order (the first step of a stage is skipped when
    the stage has more, as it often includes compilation or warm-up)."""
    by_stage: dict[str, list[float]] = {}
    for r in _events(records, "step"):
        if r.get("tok_per_s") is not None:
            by_stage.setdefault(str(r.get("stage_name", r.get("stage", "?"))), []).append(float(r["tok_per_s"]))
    return {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in by_stage.items()}


# -------------------------------------------------------------------------------------- figures


def _log_axis_helps(values: Sequence[float]) -> bool:
    pos = [v for v in values if v and v > 0]
    return len(pos) > 1 and max(pos) / min(pos) >= 20


def _human_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: format_tokens(v))


def _loss_plot(ax: Any, runs: list[tuple[str, list[dict]]], key: str, xlabel: str) -> bool:
    """Training loss (raw, faint; smoothed) and eval points; True when some curve was smoothed."""
    all_x: list[float] = []
    smoothed = False
    for i, (name, records) in enumerate(runs):
        color = _COLORS[i % len(_COLORS)]
        steps = [r for r in _events(records, "step") if r.get(key) is not None and r.get("loss") is not None]
        xs = [float(r[key]) for r in steps]
        ys = [float(r["loss"]) for r in steps]
        all_x += xs
        smoothed = smoothed or len(xs) >= 100
        if xs:
            ax.plot(xs, ys, color=color, alpha=0.15, linewidth=0.8)
            ax.plot(xs, _smooth(ys), color=color, linewidth=1.8, label=f"{name} (train, smoothed)")
        evals = [r for r in _events(records, "eval") if r.get(key) is not None]
        lengths = sorted({int(r["seq_len"]) for r in evals})
        markers = "osD^v<>px*"
        for j, length in enumerate(lengths):
            pts = [r for r in evals if int(r["seq_len"]) == length]
            ex = [float(r[key]) for r in pts]
            all_x += ex
            ax.plot(
                ex,
                [float(r["loss"]) for r in pts],
                linestyle="--",
                linewidth=1,
                marker=markers[j % len(markers)],
                markersize=7,
                color=color,
                markeredgecolor="black",
                label=f"{name} (eval @ {length} tok context)",
            )
    if _log_axis_helps(all_x):
        ax.set_xscale("log")
    elif key in ("tokens", "flops"):
        ax.xaxis.set_major_formatter(_human_formatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper right")
    return smoothed


def _stage_lines(ax: Any, records: list[dict], color: str, label_y: float | None) -> None:
    for st in _events(records, "stage"):
        t = float(st.get("tokens", 0))
        if t > 0:
            ax.axvline(t, color=color, linestyle="--", linewidth=1, alpha=0.7)
        if label_y is not None:
            ax.annotate(
                str(st.get("stage_name", st.get("stage", ""))),
                xy=(max(t, 0), 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                va="top",
                ha="left",
                fontsize=8,
                color=color,
                rotation=0,
            )


def _knobs_figure(plt: Any, runs: list[tuple[str, list[dict]]]) -> Any:
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    panels = (
        ("seq_len", "sequence length (tokens)"),
        ("batch_size", "batch size (sequences)"),
        ("lr", "learning rate"),
    )
    for i, (name, records) in enumerate(runs):
        color = _COLORS[i % len(_COLORS)]
        steps = [r for r in _events(records, "step") if r.get("tokens") is not None]
        # A step record's tokens count the step itself; plot each step from where it started.
        xs = [float(r["tokens"]) - float(r.get("seq_len") or 0) * float(r.get("batch_size") or 0) for r in steps]
        for k, (ax, (key, _)) in enumerate(zip(axes, panels, strict=True)):
            pts = [(x, r[key]) for x, r in zip(xs, steps, strict=True) if r.get(key) is not None]
            if pts:
                pts.append((float(steps[-1]["tokens"]), pts[-1][1]))  # the last step runs to the end
                ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=color, linewidth=1.6, label=name)
            _stage_lines(ax, records, color, label_y=1.0 if k == 0 else None)
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.4)
        if key == "seq_len":
            vals = [r[key] for _, rec in runs for r in _events(rec, "step") if r.get(key)]
            if vals and max(vals) / max(min(vals), 1) >= 4:
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("tokens seen")
    axes[-1].xaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: format_tokens(v)))
    axes[0].set_title("Schedule knobs against tokens (dashed lines: stage boundaries)")
    fig.tight_layout()
    return fig


def _val_by_length_figure(plt: Any, runs: list[tuple[str, list[dict]]]) -> Any:
    fig, ax = plt.subplots(figsize=(10, 5.5))
    all_lengths: set[int] = set()
    for i, (name, records) in enumerate(runs):
        final = _final_evals(records)
        if not final:
            continue
        lengths = sorted(final)
        all_lengths.update(lengths)
        ax.plot(
            lengths,
            [final[n]["loss"] for n in lengths],
            marker="o",
            linewidth=1.8,
            color=_COLORS[i % len(_COLORS)],
            label=name,
        )
    ax.set_xscale("log", base=2)
    if all_lengths:
        ax.set_xticks(sorted(all_lengths))
        ax.set_xticklabels([str(n) for n in sorted(all_lengths)])
        ax.minorticks_off()
    ax.set_xlabel("context length (tokens, log2 scale)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("Final validation loss per context length")
    ax.grid(True, alpha=0.4)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def _tok_per_s_figure(plt: Any, runs: list[tuple[str, list[dict]]]) -> Any:
    per_run = [(name, _stage_tok_per_s(records)) for name, records in runs]
    stages: list[str] = []
    for _, d in per_run:
        stages += [s for s in d if s not in stages]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    n = max(len(per_run), 1)
    width = 0.8 / n
    for i, (name, d) in enumerate(per_run):
        xs = [j + (i - (n - 1) / 2) * width for j, s in enumerate(stages) if s in d]
        ys = [d[s] for s in stages if s in d]
        bars = ax.bar(xs, ys, width=width, color=_COLORS[i % len(_COLORS)], label=name)
        ax.bar_label(bars, labels=[format_tokens(y) for y in ys], fontsize=8, padding=2)
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages)
    ax.set_xlabel("stage")
    ax.set_ylabel("median throughput (tokens/s)")
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: format_tokens(v)))
    ax.set_title("Training throughput per stage")
    ax.grid(True, axis="y", alpha=0.4)
    ax.margins(y=0.12)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def plot_run_figures(runs: list[tuple[str, list[dict]]], out_dir: Path) -> dict[str, Path]:
    """Write the report's PNGs for one or more runs (overlaid) into ``out_dir``; {name: path}."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display is needed or wanted
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (plt.matplotlib.ticker)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[name] = path

    for name, key, xlabel, title in (
        ("loss_vs_tokens", "tokens", "tokens seen", "Loss against tokens"),
        ("loss_vs_time", "train_time", "training time (seconds)", "Loss against training time"),
        ("loss_vs_flops", "flops", "training compute (FLOPs)", "Loss against compute"),
    ):
        fig, ax = plt.subplots(figsize=(10, 5.5))
        smoothed = _loss_plot(ax, runs, key, xlabel)
        ax.set_title(title + (" (faint: raw training loss)" if smoothed else ""))
        fig.tight_layout()
        save(fig, name)
    save(_knobs_figure(plt, runs), "knobs")
    save(_val_by_length_figure(plt, runs), "val_loss_by_length")
    save(_tok_per_s_figure(plt, runs), "tokens_per_s_by_stage")
    return paths


# ----------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .35em .8em; text-align: right; }
th { background: #f2f4f7; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #e4e4e4; }
figcaption { font-size: .9em; color: #555; }
"""


def _title_of(name: str) -> str:
    return name.replace("_", " ").replace("tokens per s", "tokens/s").capitalize()


def write_html(title: str, figures: dict[str, Path], tables: Iterable[Table], out_path: Path) -> Path:
    """One self-contained HTML file: tables first, then the figures embedded as base64 PNGs."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for caption, header, rows in tables:
        parts.append(f"<h2>{esc(caption)}</h2><table><thead><tr>")
        parts += [f"<th>{esc(str(h))}</th>" for h in header]
        parts.append("</tr></thead><tbody>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>")
        parts.append("</tbody></table>")
    if figures:
        parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="{esc(name)}"><img alt="{esc(_title_of(name))}" '
            f'src="data:image/png;base64,{data}"><figcaption>{esc(_title_of(name))}</figcaption></figure>'
        )
    parts.append("</body></html>\n")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path


# ------------------------------------------------------------------------------------- reports


def _fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _fmt_loss(x: Any) -> str:
    return "-" if x is None else f"{float(x):.4f}"


def _load_run(run_dir: Path, on: str | None = None) -> tuple[str, list[dict], dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(
            f"run folder {run_dir} does not exist; train one first with `rampup train CONFIG` "
            f"(its train.out_dir is the run folder)"
        )
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise DataError(
            f"{metrics} not found: {run_dir} is not a run folder; pass the train.out_dir of a run "
            f"made with `rampup train CONFIG`"
        )
    records = read_metrics(metrics)
    if not records:
        raise DataError(
            f"{metrics} has no complete records; the run has not logged a step yet "
            f"(run `rampup train CONFIG` longer, or wait for it)"
        )
    parts = _source_table_rows(records)
    records = select_eval_set(records, on, run_dir)
    if parts:
        records.append({"event": "_sources", "rows": parts})
    summary: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (json.JSONDecodeError, OSError):
            summary = {}
    name = summary.get("name") or _config_name(run_dir) or run_dir.name
    return str(name), records, summary


def _config_name(run_dir: Path) -> str | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except Exception:
        return None
    return data.get("name") if isinstance(data, dict) else None


def _summary_row(name: str, records: list[dict], summary: dict, lengths: list[int]) -> list[str]:
    steps = _events(records, "step")
    last = steps[-1] if steps else {}
    final = _final_evals(records)
    val = {int(k): v for k, v in (summary.get("val_loss") or {}).items()}
    for n, r in final.items():
        val.setdefault(n, r["loss"])
    n_steps = summary.get("steps", last.get("step"))
    tokens = summary.get("tokens", last.get("tokens"))
    flops = summary.get("flops", last.get("flops"))
    return [
        name,
        "-" if n_steps is None else f"{int(n_steps):,}",
        "-" if tokens is None else f"{format_tokens(tokens)} ({int(tokens):,})",
        "-" if flops is None else f"{float(flops):.3g}",
        _fmt_seconds(summary.get("train_time", last.get("train_time"))),
        _fmt_loss(last.get("loss")),
    ] + [_fmt_loss(val.get(n)) for n in lengths]


def _tables(loaded: list[tuple[str, list[dict], dict]]) -> list[Table]:
    lengths = sorted(
        {int(k) for _, rec, s in loaded for k in (s.get("val_loss") or {})}
        | {n for _, rec, _ in loaded for n in _final_evals(rec)}
    )
    header = ["run", "steps", "tokens", "FLOPs", "train time", "last train loss"] + [f"val loss @ {n}" for n in lengths]
    summary = ("Run summary", header, [_summary_row(n, r, s, lengths) for n, r, s in loaded])
    stage_rows: list[list[str]] = []
    for name, records, _ in loaded:
        tps = _stage_tok_per_s(records)
        starts = {str(st.get("stage_name")): st for st in _events(records, "stage")}
        steps_per_stage: dict[str, int] = {}
        for r in _events(records, "step"):
            key = str(r.get("stage_name", r.get("stage", "?")))
            steps_per_stage[key] = steps_per_stage.get(key, 0) + 1
        for stage, v in tps.items():
            st = starts.get(stage, {})
            knobs = st.get("knobs") or {}
            knob_text = ", ".join(f"{k}={v2}" for k, v2 in knobs.items())
            stage_rows.append(
                [
                    name,
                    stage,
                    format_tokens(st.get("tokens", 0)) if st else "-",
                    f"{steps_per_stage.get(stage, 0):,}",
                    format_tokens(v),
                    knob_text or "-",
                ]
            )
    stages = (
        "Throughput per stage",
        ["run", "stage", "starts at (tokens)", "steps", "median tokens/s", "knobs"],
        stage_rows,
    )
    shape_rows = [row for name, records, _ in loaded for row in shape_table_rows(name, records)]
    shapes = (
        "Where the time goes, per batch shape (honest FLOPs against this machine's matmul roof; shares "
        "from train.profile_every)",
        SHAPE_COLUMNS,
        shape_rows,
    )
    return [summary, stages, shapes]


SHAPE_COLUMNS = [
    "run",
    "rows x length",
    "steps",
    "median step",
    "GFLOP/s",
    "of roof",
    "forward",
    "backward",
    "optimizer",
    "host",
    "profiled steps",
]


def shape_profile(records: list[dict]) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (rows, seq_len) of the step records: steps, median step time and achieved FLOP/s, its share
    of the run's matmul roof, and the mean shares of the profiled steps (forward, backward, optimizer, host)."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for r in _events(records, "step"):
        if "flops_per_s" not in r:
            continue
        d = out.setdefault((int(r["batch_size"]), int(r["seq_len"])), {"times": [], "flops": [], "roof": []})
        d["times"].append(float(r["step_time"]))
        d["flops"].append(float(r["flops_per_s"]))
        if "roof_share" in r:
            d["roof"].append(float(r["roof_share"]))
    prof: dict[tuple[int, int], list[dict]] = {}
    for r in _events(records, "profile"):
        prof.setdefault((int(r["rows"]), int(r["seq_len"])), []).append(r)
    for key, d in out.items():
        d["steps"] = len(d["times"])
        d["median_step_time"] = statistics.median(d.pop("times"))
        d["median_flops_per_s"] = statistics.median(d.pop("flops"))
        roof = d.pop("roof")
        d["roof_share"] = statistics.median(roof) if roof else None
        ps = prof.get(key, [])
        d["profiled_steps"] = len(ps)
        d["shares"] = (
            {
                part: statistics.fmean(p[part] / p["step_time"] for p in ps if p["step_time"] > 0)
                for part in ("forward", "backward", "optimizer", "host")
            }
            if ps
            else None
        )
    return dict(sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def shape_table_rows(name: str, records: list[dict]) -> list[list[str]]:
    rows = []
    for (b, t), d in shape_profile(records).items():
        sh = d["shares"] or {}
        pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        rows.append(
            [
                name,
                f"{b} x {t}",
                f"{d['steps']:,}",
                f"{1000 * d['median_step_time']:.0f} ms",
                f"{d['median_flops_per_s'] / 1e9:.1f}",
                pct(d["roof_share"]),
                *(pct(sh.get(k)) for k in ("forward", "backward", "optimizer", "host")),
                str(d["profiled_steps"]),
            ]
        )
    return rows


def _unique_names(loaded: list[tuple[str, list[dict], dict]], dirs: list[Path]) -> list[tuple[str, list[dict], dict]]:
    names = [n for n, _, _ in loaded]
    out = []
    for (name, rec, s), d in zip(loaded, dirs, strict=True):
        if names.count(name) > 1:
            name = f"{name} ({Path(d).name})" if Path(d).name != name else f"{name} ({d})"
        out.append((name, rec, s))
    return out


def _source_table_rows(records: list[dict]) -> list[list[str]]:
    """A mixture run's final loss per source and length, and the tokens each source gave."""
    final: dict[tuple[str, int], float] = {}
    for r in _events(records, "eval"):
        if "set" in r:
            final[str(r["set"]), int(r["seq_len"])] = float(r["loss"])
    tokens: dict[str, int] = {}
    for r in _events(records, "mix"):
        for name, n in r.get("tokens", {}).items():
            tokens[name] = tokens.get(name, 0) + int(n)
    names = sorted({n for n, _ in final} | set(tokens))
    return [
        [
            name,
            format_tokens(tokens.get(name, 0)),
            ", ".join(f"{final[name, n]:.4f} @ {n}" for n in sorted(L for m, L in final if m == name)) or "-",
        ]
        for name in names
    ]


def _sources_table(loaded: list[tuple[str, list[dict], dict]]) -> list[Table]:
    tables = []
    for name, records, _ in loaded:
        rows = next((r["rows"] for r in records if r.get("event") == "_sources"), None)
        if rows:
            tables.append(
                (
                    f"sources of {name}: tokens trained and final validation loss",
                    ["source", "tokens", "final loss"],
                    rows,
                )
            )
    return tables


def report_runs(run_dirs: list[Path], out_dir: Path, extra_tables: Iterable[Table] = (), on: str | None = None) -> Path:
    """Compare runs: overlaid figures plus summary tables (and ``extra_tables``) in ``out_dir/report.html``;
    ``on``: the loss of that source of a data mixture is the runs' validation loss."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise DataError("no run folders given; pass one or more train.out_dir folders of `rampup train` runs")
    loaded = _unique_names([_load_run(d, on) for d in run_dirs], run_dirs)
    out_dir = Path(out_dir)
    figures = plot_run_figures([(n, r) for n, r, _ in loaded], out_dir)
    title = (
        f"rampup report: {loaded[0][0]}"
        if len(loaded) == 1
        else "rampup comparison: " + ", ".join(n for n, _, _ in loaded)
    )
    tables = [*_tables(loaded), *_sources_table(loaded), *extra_tables]
    return write_html(title, figures, tables, out_dir / "report.html")


def report_run(run_dir: Path, out_dir: Path | None = None, on: str | None = None) -> Path:
    """Report of one run (``rampup report RUN_DIR``); written to ``out_dir`` (default RUN_DIR/report)."""
    run_dir = Path(run_dir)
    return report_runs([run_dir], run_dir / "report" if out_dir is None else Path(out_dir), on=on)
