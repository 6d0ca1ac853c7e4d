"""Reports: figures and a self-contained HTML page from run folders in the real on-disk format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rampup.config import RunConfig, dump_config
from rampup.errors import DataError
from rampup.tools.report import FIGURES, report_run, report_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, steps: int = 40, loss0: float = 6.0, cut_last_line: bool = False) -> Path:
    """A finished run folder: 2 stages (short/long), evals at 64 and 256 every 20 steps."""
    run = root / name
    run.mkdir(parents=True)
    cfg = RunConfig()
    (run / "config.yaml").write_text(dump_config(cfg.model_copy(update={"name": name})))
    records: list[dict] = []
    tokens, train_time, flops = 0, 0.0, 0.0
    stages = [(0, "short", 64, 64), (steps // 2, "long", 256, 16)]
    for step in range(1, steps + 1):
        stage = 0 if step <= steps // 2 else 1
        start, sname, seq, bs = stages[stage]
        if step == start + 1:
            records.append(
                {
                    "event": "stage",
                    "step": start,
                    "tokens": tokens,
                    "stage": stage,
                    "stage_name": sname,
                    "knobs": {"seq_len": seq, "batch_tokens": seq * bs, "lr_mult": 1.0},
                }
            )
        tokens += seq * bs
        step_time = 0.05 if stage == 0 else 0.04
        train_time += step_time
        flops += 1e9
        records.append(
            {
                "event": "step",
                "step": step,
                "tokens": tokens,
                "loss": loss0 - math.log(step) * 0.3,
                "lr": 1e-3 * min(1.0, step / 5),
                "seq_len": seq,
                "batch_size": bs,
                "stage": stage,
                "stage_name": sname,
                "tok_per_s": seq * bs / step_time,
                "step_time": step_time,
                "train_time": train_time,
                "flops": flops,
                "wall": 1.7e9 + step,
            }
        )
        if step % 20 == 0:
            for length, delta in ((64, 0.05), (256, 0.0)):
                records.append(
                    {
                        "event": "eval",
                        "step": step,
                        "tokens": tokens,
                        "seq_len": length,
                        "loss": loss0 - math.log(step) * 0.3 + delta,
                        "train_time": train_time,
                        "flops": flops,
                    }
                )
    text = "".join(json.dumps(r) + "\n" for r in records)
    if cut_last_line:
        text += json.dumps({"event": "step", "step": steps + 1, "tokens": tokens})[:25]  # a crash mid-write
    (run / "metrics.jsonl").write_text(text)
    final = {str(r["seq_len"]): r["loss"] for r in records if r["event"] == "eval"}
    (run / "summary.json").write_text(
        json.dumps(
            {
                "name": name,
                "steps": steps,
                "tokens": tokens,
                "flops": flops,
                "train_time": train_time,
                "val_loss": final,
            }
        )
    )
    return run


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 8_000, (path, len(data))


def check_html(html: str, figures: dict | None = None) -> None:
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert 'src="http' not in html and 'href="http' not in html and "<script" not in html
    assert "<link" not in html


def test_report_run_writes_figures_and_self_contained_html(tmp_path):
    run = make_run(tmp_path, "alpha_run")
    out = report_run(run)
    assert out == run / "report" / "report.html"
    for name in FIGURES:
        check_png(run / "report" / f"{name}.png")
    html = out.read_text()
    check_html(html)
    assert "alpha_run" in html
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['steps']:,}" in html and f"{summary['tokens']:,}" in html
    for length, loss in summary["val_loss"].items():
        assert f"val loss @ {length}" in html
        assert f"{loss:.4f}" in html
    # throughput per stage: short 64*64/0.05 = 81.9K tok/s, long 256*16/0.04 = 102K tok/s
    assert "short" in html and "long" in html and "81.9K" in html and "102K" in html
    # tables come before the figures
    assert html.index("Run summary") < html.index("data:image/png")


def test_report_run_custom_out_dir(tmp_path):
    run = make_run(tmp_path, "beta")
    out = report_run(run, tmp_path / "elsewhere")
    assert out == tmp_path / "elsewhere" / "report.html" and out.is_file()
    assert not (run / "report").exists()


def test_report_runs_overlays_and_extra_tables(tmp_path):
    a = make_run(tmp_path, "baseline", loss0=6.0)
    b = make_run(tmp_path, "ramped<b>", steps=60, loss0=5.5)
    extra = [("Comparison", ["metric", "baseline", "ramped"], [["tokens to loss 5.0", "1.2M", "0.9M"]])]
    out = report_runs([a, b], tmp_path / "cmp", extra_tables=extra)
    html = out.read_text()
    check_html(html)
    for name in FIGURES:
        check_png(tmp_path / "cmp" / f"{name}.png")
    assert "baseline" in html and "ramped&lt;b&gt;" in html and "ramped<b>" not in html
    assert "Comparison" in html and "tokens to loss 5.0" in html
    assert "60" in html and "40" in html


def test_same_names_are_told_apart(tmp_path):
    a = make_run(tmp_path / "x", "same")
    b = make_run(tmp_path / "y", "same")
    html = report_runs([a, b], tmp_path / "cmp").read_text()
    assert html.count("<td>same (") >= 2


def test_missing_run_folder_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nope") as e:
        report_run(tmp_path / "nope")
    assert "rampup train" in str(e.value)


def test_folder_without_metrics_raises_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metrics.jsonl"):
        report_run(tmp_path / "empty")


def test_metrics_cut_mid_line_still_reports(tmp_path):
    run = make_run(tmp_path, "crashed", cut_last_line=True)
    (run / "summary.json").unlink()  # a crashed run has no summary; numbers come from metrics
    html = report_run(run).read_text()
    check_html(html)
    assert "crashed" in html  # name from config.yaml
    assert "40" in html
