"""compare: synthetic run folders (real files in the trainer's formats), numbers recomputed by hand."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from rampup.config import RunConfig, dump_config
from rampup.errors import ConfigError, DataError
from rampup.tools.compare import (
    compare_runs,
    load_run,
    print_comparison,
    time_to_target,
    write_comparison,
)


def make_run(
    root: Path,
    folder: str,
    evals: dict[int, list[tuple[float, float]]],
    *,
    name: str | None = None,
    seed: int = 0,
    lr: float = 3e-3,
    data: dict | None = None,
    summary: bool = True,
    compile_time: float | None = None,
    precision: str | None = None,
) -> Path:
    """A run folder whose eval at each length goes through (train_time, loss) pairs; tokens = 100 * time.
    ``compile_time``: seconds of compiling, all before the first eval; ``precision``: the run event's."""
    out = root / folder
    out.mkdir(parents=True)
    cfg = RunConfig.model_validate(
        {
            "name": name or folder,
            "optimizer": {"lr": lr},
            "data": data or {},
            "train": {"seed": seed, "out_dir": str(out)},
            "eval": {"seq_lens": sorted(evals)},
        }
    )
    (out / "config.yaml").write_text(dump_config(cfg))
    lines, step = [], 0
    if precision is not None:
        lines.append(
            {
                "event": "run",
                "step": 0,
                "name": cfg.name,
                "device": "cpu",
                "precision": {"precision": precision, "requested": "auto", "native_bf16": True, "reason": ""},
            }
        )
    n_points = max(len(v) for v in evals.values())
    for i in range(n_points):
        t = next(v[i][0] for v in evals.values() if i < len(v))
        step += 1
        lines.append(
            {
                "event": "step",
                "step": step,
                "tokens": int(100 * t),
                "loss": 6.0,
                "lr": lr,
                "seq_len": 64,
                "batch_size": 8,
                "stage": 0,
                "stage_name": "s",
                "tok_per_s": 1.0,
                "step_time": 1.0,
                "train_time": t,
                "flops": 1e9 * t,
                "wall": 0.0,
            }
        )
        for n, pts in evals.items():
            if i < len(pts):
                tt, loss = pts[i]
                lines.append(
                    {
                        "event": "eval",
                        "step": step,
                        "tokens": int(100 * tt),
                        "seq_len": n,
                        "loss": loss,
                        "train_time": tt,
                        "flops": 1e9 * tt,
                        **({"compile_time": compile_time} if compile_time is not None else {}),
                    }
                )
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if summary:
        last = {n: pts[-1][1] for n, pts in evals.items()}
        (out / "summary.json").write_text(
            json.dumps({"name": cfg.name, "steps": step, "val_loss": {str(n): v for n, v in last.items()}})
        )
    return out


def row(result: dict, label: str, n: int) -> dict:
    g = next(g for g in result["groups"] if g["label"] == label)
    return g["lengths"][str(n)]


def render(result: dict) -> str:
    buf = io.StringIO()
    print_comparison(result, Console(file=buf, width=250, color_system=None))
    return buf.getvalue()


def test_time_to_target_first_hit_no_interpolation():
    evals = [(100, 10.0, 1e9, 5.0), (200, 20.0, 2e9, 4.0), (300, 30.0, 3e9, 3.0)]
    hit = {"tokens": 200, "train_time": 20.0, "compile_time": 0.0, "time": 20.0, "flops": 2e9}
    assert time_to_target(evals, 4.5) == hit and time_to_target(evals, 4.0) == hit
    assert time_to_target(evals, 2.0) is None
    compiled = [(t, tt, f, loss, 7.5) for t, tt, f, loss in evals]  # 7.5 s of graph building before
    assert time_to_target(compiled, 4.5) == {**hit, "compile_time": 7.5, "time": 27.5}


def test_compile_time_counts_toward_time_to_target_and_mixed_precisions_are_flagged(tmp_path):
    """An arm that compiled pays its compile time: the wall-clock speed-up includes it, the one
    without is shown beside it; arms at different resolved precisions get a warning and a label."""
    fast = make_run(tmp_path, "fast", {256: [(10, 5.0), (20, 3.4)]}, lr=1e-3, compile_time=12.0, precision="bf16")
    base = make_run(tmp_path, "base", {256: [(10, 5.5), (40, 3.5)]}, precision="fp32")
    result = compare_runs([fast, base])
    r = row(result, "fast", 256)
    assert r["seeds"][0]["time"] == 32.0 and r["compile_time"]["median"] == 12.0
    assert r["speedup_wall"]["median"] == pytest.approx(40 / 32)
    assert r["speedup_wall_excl_compile"]["median"] == pytest.approx(40 / 20)
    assert any("different precisions ('fast' bf16, 'base' fp32)" in w for w in result["warnings"])
    text = render(result)
    assert "fast, bf16" in text and "base (baseline), fp32" in text and "1.25x" in text and "2.00x" in text
    same = compare_runs(
        [
            make_run(tmp_path, "a", {256: [(10, 3.0)]}, precision="fp32"),
            make_run(tmp_path, "b", {256: [(10, 3.0)]}, lr=1e-3, precision="fp32"),
        ]
    )
    assert not any("precision" in w for w in same["warnings"]) and ", fp32" not in render(same)


def test_speedup_against_baseline_recomputed(tmp_path):
    fast = make_run(tmp_path, "fast", {256: [(10, 5.0), (20, 4.0), (30, 3.0)]}, lr=1e-3)
    base = make_run(tmp_path, "base", {256: [(10, 5.5), (20, 4.5), (40, 3.5)]})
    result = compare_runs([fast, base])
    assert result["baseline"] == "base"
    assert result["targets"] == {"256": 3.5}  # baseline's final loss
    r = row(result, "fast", 256)
    assert r["seeds"][0]["train_time"] == 30.0 and r["seeds"][0]["tokens"] == 3000
    assert r["speedup_wall"]["median"] == pytest.approx(40 / 30)
    assert r["speedup_flops"]["median"] == pytest.approx(40e9 / 30e9)
    assert r["final_loss"]["median"] == 3.0
    b = row(result, "base", 256)
    assert b["train_time"]["median"] == 40.0 and b["speedup_wall"]["median"] == 1.0
    # written file carries the same numbers
    written = json.loads(write_comparison(result, tmp_path / "compare.json").read_text())
    assert written == json.loads(json.dumps(result))
    text = render(result)
    assert "1.33x" in text and "fast" in text and "base (baseline)" in text


def test_seeds_grouped_with_median_and_spread(tmp_path):
    dirs = [
        make_run(tmp_path, f"ramp_seed{i}", {128: pts}, name="ramp", seed=i, lr=1e-3)
        for i, pts in enumerate([[(10, 4.0), (20, 3.0)], [(15, 3.8), (25, 3.2)], [(12, 3.9), (40, 3.4)]])
    ]
    dirs += [
        make_run(tmp_path, f"base_seed{i}", {128: pts}, name="base", seed=i)
        for i, pts in enumerate([[(20, 4.0), (50, 3.6)], [(20, 4.1), (60, 3.4)], [(20, 4.2), (70, 3.5)]])
    ]
    result = compare_runs(dirs)
    assert [g["label"] for g in result["groups"]] == ["ramp", "base"]
    assert result["targets"]["128"] == 3.5  # median of 3.6, 3.4, 3.5
    r = row(result, "ramp", 128)
    assert [s["seed"] for s in r["seeds"]] == [0, 1, 2]
    assert [s["train_time"] for s in r["seeds"]] == [20, 25, 40]  # first eval <= 3.5
    assert r["train_time"] == {"median": 25, "min": 20, "max": 40}
    b = row(result, "base", 128)
    # seed 0 ends at 3.6 > 3.5: never reached; counted as +inf, so the median is 70 and the max unknown
    assert [s["train_time"] for s in b["seeds"]] == [None, 60, 70]
    assert b["train_time"] == {"median": 70, "min": 60, "max": None}
    assert r["speedup_wall"] == {
        "median": pytest.approx(70 / 25),
        "min": pytest.approx(70 / 40),
        "max": pytest.approx(70 / 20),
    }
    assert r["final_loss"]["median"] == 3.2 and r["final_loss"]["min"] == 3.0 and r["final_loss"]["max"] == 3.4
    assert "not reached" in render(result)


def test_unreachable_target_is_null(tmp_path):
    slow = make_run(tmp_path, "slow", {256: [(10, 5.0), (20, 4.0)]}, lr=1e-3)
    base = make_run(tmp_path, "base", {256: [(10, 5.0), (20, 3.5)]})
    result = compare_runs([slow, base])
    r = row(result, "slow", 256)
    assert r["seeds"][0] == {**r["seeds"][0], "reached": False, "tokens": None, "train_time": None, "flops": None}
    assert r["train_time"]["median"] is None and r["speedup_wall"]["median"] is None
    assert r["speedup_flops"]["median"] is None
    write_comparison(result, tmp_path / "compare.json")
    assert '"train_time": null' in (tmp_path / "compare.json").read_text()
    line = next(ln for ln in render(result).splitlines() if "slow" in ln)
    assert line.count("not reached") == 8  # time, its compile part, tokens, FLOPs, the four speed-ups


def test_explicit_target_loss_overrides(tmp_path):
    a = make_run(tmp_path, "a", {256: [(10, 5.0), (20, 4.0), (30, 3.0)]}, lr=1e-3)
    base = make_run(tmp_path, "base", {256: [(10, 5.5), (20, 4.5), (40, 3.5)]})
    result = compare_runs([a, base], target_loss=4.5)
    assert result["targets"] == {"256": 4.5} and result["target_loss"] == 4.5
    assert row(result, "a", 256)["train_time"]["median"] == 20
    assert row(result, "base", 256)["train_time"]["median"] == 20
    assert row(result, "a", 256)["speedup_wall"]["median"] == 1.0
    # a target the baseline never reaches: no ratio, even though "a" reaches it
    result = compare_runs([a, base], target_loss=3.0)
    assert row(result, "a", 256)["train_time"]["median"] == 30
    assert row(result, "a", 256)["speedup_wall"]["median"] is None


def test_baseline_by_name_or_path(tmp_path):
    a = make_run(tmp_path, "a", {256: [(10, 5.0), (30, 3.0)]}, lr=1e-3)
    b = make_run(tmp_path, "b", {256: [(10, 5.0), (40, 3.5)]})
    for ref in ("a", str(a)):
        result = compare_runs([a, b], baseline=ref)
        assert result["baseline"] == "a" and result["targets"] == {"256": 3.0}
        assert row(result, "b", 256)["train_time"]["median"] is None
    with pytest.raises(ConfigError, match="baseline 'zzz'"):
        compare_runs([a, b], baseline="zzz")


def test_different_eval_lengths_compared_on_shared(tmp_path):
    a = make_run(tmp_path, "a", {64: [(10, 4.0)], 256: [(10, 3.0)], 512: [(10, 3.3)]}, lr=1e-3)
    b = make_run(tmp_path, "b", {256: [(20, 3.0)], 1024: [(20, 3.1)]})
    result = compare_runs([a, b])
    assert result["seq_lens"] == [256]
    assert list(row(result, "a", 256)) and set(result["groups"][0]["lengths"]) == {"256"}
    assert len(result["warnings"]) == 1 and "[64, 512, 1024]" in result["warnings"][0]
    assert row(result, "a", 256)["speedup_wall"]["median"] == 2.0
    assert "warning" in render(result)


def test_different_data_is_an_error(tmp_path):
    a = make_run(tmp_path, "a", {256: [(10, 3.0)]}, data={"max_files": 10})
    b = make_run(tmp_path, "b", {256: [(10, 3.0)]}, data={"max_files": 20})
    with pytest.raises(ConfigError, match="compared runs must share data; 'b'"):
        compare_runs([a, b])
    # where the cache lives does not change the data
    c = make_run(tmp_path, "c", {256: [(10, 3.0)]}, data={"max_files": 10, "cache_dir": "/elsewhere"})
    compare_runs([a, c])


def test_truncated_metrics_still_load(tmp_path):
    d = make_run(tmp_path, "crashed", {256: [(10, 5.0), (20, 4.0)]}, summary=False)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"event": "eval", "step": 3, "tokens": 3000, "seq_len": 256, "lo')
    run = load_run(d)
    assert run.evals[256] == [(1000, 10.0, 1e10, 5.0, 0.0), (2000, 20.0, 2e10, 4.0, 0.0)]  # no compile recorded: 0
    assert run.final == {256: 4.0} and run.seed == 0 and len(run.steps) == 2


def test_missing_folder_or_metrics_is_data_error(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_run(tmp_path / "nope")
    d = make_run(tmp_path, "empty", {256: [(10, 5.0)]})
    (d / "metrics.jsonl").unlink()
    with pytest.raises(DataError, match=str(d)):
        load_run(d)


def test_group_key_ignores_seed_out_dir_and_name(tmp_path):
    a = load_run(make_run(tmp_path, "x-s0", {256: [(10, 3.0)]}, seed=0))
    b = load_run(make_run(tmp_path, "x-s1", {256: [(10, 3.0)]}, seed=7))
    c = load_run(make_run(tmp_path, "y", {256: [(10, 3.0)]}, lr=1e-3))
    assert a.group_key == b.group_key != c.group_key
    result = compare_runs([a.path, b.path, c.path], baseline="x")
    assert [g["label"] for g in result["groups"]] == ["y", "x"]
    assert result["groups"][1]["seeds"] == [0, 7]


def test_run_and_compare_checks_configs_before_training(tmp_path):
    from rampup.tools.compare import run_and_compare

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {duration: '10 steps'}\n")
    b.write_text("train: {duration: '20 steps'}\n")
    with pytest.raises(ConfigError, match="train.duration"):
        run_and_compare([a, b], seeds=1, overrides=[], out_root=tmp_path / "out", console=Console(file=io.StringIO()))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="distinct names"):
        run_and_compare([a, a], seeds=1, overrides=[], out_root=tmp_path / "out", console=Console(file=io.StringIO()))


def test_even_seed_count_uses_upper_median_target(tmp_path):
    base = [
        make_run(tmp_path, f"base_seed{i}", {128: pts}, name="base", seed=i)
        for i, pts in enumerate([[(20, 4.0), (50, 3.6)], [(20, 4.1), (60, 3.4)]])
    ]
    result = compare_runs(base)
    assert result["targets"]["128"] == 3.6  # upper median of 3.4, 3.6: both seeds reach it
    b = row(result, "base", 128)
    assert [s["train_time"] for s in b["seeds"]] == [50, 60] and b["train_time"]["median"] == 55
    assert b["speedup_wall"] == {"median": 1.0, "min": pytest.approx(55 / 60), "max": pytest.approx(55 / 50)}


def _with_parts(run: Path, parts: dict[str, float]) -> Path:
    """Add a mixture's per-source evaluations (``{"set": name}``) beside each main evaluation, at loss + offset."""
    path = run / "metrics.jsonl"
    out = []
    for r in map(json.loads, path.read_text().splitlines()):
        out.append(r)
        if r["event"] == "eval":
            out += [{**r, "set": name, "loss": r["loss"] + d} for name, d in parts.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return run


def test_on_a_source_compares_that_source_and_a_one_corpus_run_by_its_corpus(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    mixed = {
        "sources": {"code": {"source": "stdlib"}, "docs": {"source": str(tmp_path)}},
        "tokenizer": {"path": str(tok)},
    }
    a = _with_parts(make_run(tmp_path, "a", {64: [(1.0, 5.0), (2.0, 4.0)]}, data=mixed), {"code": 0.5, "docs": -0.5})
    b = _with_parts(  # another config (lr): another group, the baseline
        make_run(tmp_path, "b", {64: [(1.0, 5.0), (2.0, 4.2)]}, data=mixed, lr=1e-3), {"code": 0.1, "docs": 0.0}
    )
    on_code = compare_runs([a, b], on="code")
    assert on_code["on"] == "code" and on_code["targets"]["64"] == pytest.approx(4.3)  # b's final code loss
    assert row(on_code, "a", 64)["final_loss"]["median"] == pytest.approx(4.5)
    pooled = compare_runs([a, b])
    assert pooled["targets"]["64"] == pytest.approx(4.2)
    with pytest.raises(DataError, match="evaluated no source named 'cod'; its sources: code, docs"):
        compare_runs([a, b], on="cod")
    # a one-corpus run over the same source and tokenizer compares with the mixture's source
    one = make_run(tmp_path, "one", {64: [(1.0, 5.0), (2.0, 4.4)]}, data={"tokenizer": {"path": str(tok)}}, lr=1e-3)
    assert compare_runs([a, one], on="code")["targets"]["64"] == pytest.approx(4.4)
    other = make_run(tmp_path, "other", {64: [(1.0, 5.0), (2.0, 4.4)]}, lr=1e-3)  # its own tokenizer: not comparable
    with pytest.raises(ConfigError, match="must share data"):
        compare_runs([a, other], on="code")
