"""train.precision: auto picks bf16 only where this machine runs it natively; the choice travels with the run.

The slow path is checked on every machine: ``ONEDNN_MAX_CPU_ISA=AVX2`` takes oneDNN's bf16 kernels
away on an AVX-512-bf16 or AMX CPU (bf16 matmuls then run ~80x slower than fp32), and CPUID-based
helpers cannot see that, so `auto` must measure it.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import (
    rampup_cmd,
    run_rampup,
    step_losses,
    tiny_tree,
    weights,
    write_config,
)

SLOW_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}

RESOLVE = """
import json, torch
from rampup.engine.precision import cpu_bf16_instructions, probe_cpu_bf16, resolve_precision
p = resolve_precision("auto", "cpu")
cpuid = cpu_bf16_instructions()  # without the instructions nothing is probed (nor cached): don't probe here either
print(json.dumps({"auto": p.as_dict(), "cpuid": cpuid, "probe": probe_cpu_bf16() if cpuid else None}))
"""


def resolve_in_child(cache, env_extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SLOW_BF16} | {"RAMPUP_CACHE_DIR": str(cache)}
    res = subprocess.run(
        [sys.executable, "-c", RESOLVE], capture_output=True, text=True, timeout=120, env=env | (env_extra or {})
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_auto_is_not_fooled_by_a_limited_instruction_set(tmp_path):
    limited = resolve_in_child(tmp_path, SLOW_BF16)
    assert limited["auto"]["precision"] == "fp32" and not limited["auto"]["native_bf16"]
    if limited["cpuid"]:  # CPUID still says bf16: only the measurement can tell, and it must say slow
        assert "ONEDNN_MAX_CPU_ISA=AVX2" in limited["auto"]["reason"]  # the decision, not the timing behind it
    full = resolve_in_child(tmp_path)
    assert full["auto"]["precision"] == ("bf16" if full["auto"]["native_bf16"] else "fp32")
    if not full["cpuid"]:
        assert full["auto"]["precision"] == "fp32" and "no AVX-512 bf16 or AMX" in full["auto"]["reason"]
    else:
        assert full["auto"]["native_bf16"] == (full["probe"]["bf16_gflops"] >= 1.2 * full["probe"]["fp32_gflops"])
    # both measurements are cached under their own key (the ISA variable is part of it)
    path = tmp_path / "precision.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    assert len(cache) == (2 if full["cpuid"] else 1 if limited["cpuid"] else 0)


def test_the_probe_is_cached_per_machine(tmp_path):
    first = resolve_in_child(tmp_path)
    if not first["cpuid"]:
        pytest.skip("no bf16 instructions: auto decides from CPUID alone, nothing is probed or cached")
    path = tmp_path / "precision.json"
    cache = json.loads(path.read_text())
    (key,) = cache
    flipped = (
        {"fp32_gflops": 100.0, "bf16_gflops": 1000.0, "ratio": 10.0, "native": True}
        if not cache[key]["native"]
        else {"fp32_gflops": 100.0, "bf16_gflops": 1.0, "ratio": 0.01, "native": False}
    )
    path.write_text(json.dumps({key: flipped}))
    again = resolve_in_child(tmp_path)  # reads the (doctored) cache instead of measuring again
    assert again["auto"]["native_bf16"] == flipped["native"]
    assert again["auto"]["precision"] == ("bf16" if flipped["native"] else "fp32")


def test_explicit_choices_are_obeyed_and_unknown_ones_refused():
    from rampup.config import load_config
    from rampup.engine.precision import resolve_precision
    from rampup.errors import ConfigError

    assert resolve_precision("fp32", "cpu").precision == "fp32"
    assert resolve_precision("bf16", "cpu").precision == "bf16"
    assert load_config(None).train.precision == "auto"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.precision=fp16"])
    assert "'auto', 'bf16' or 'fp32'" in str(e.value)


def test_yaml_booleans_are_the_words_the_user_wrote(tmp_path):
    from rampup.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("log: {progress: off}\n")
    assert load_config(path).log.progress == "off"
    assert load_config(None, ["log.progress=off"]).log.progress == "off"
    assert load_config(None, ["log.progress=plain"]).log.progress == "plain"


@pytest.mark.slow
def test_bf16_on_a_cpu_without_it_warns_once_before_the_first_step(data_cache, tmp_path):
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_tree(
            data_cache,
            tmp_path / "run",
            train={"duration": "3 steps", "checkpoint_every": None, "precision": "bf16"},
            eval={"seq_lens": [64], "max_tokens": 128},
            schedule={"knobs": {"batch_tokens": 256, "seq_len": 64}, "stages": [{"name": "one"}]},
        ),
    )
    env = os.environ | {"PYTHONHASHSEED": "0", "RAMPUP_CACHE_DIR": str(tmp_path / "cache")} | SLOW_BF16
    res = subprocess.run(
        rampup_cmd("train", str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stdout
    out = res.stdout
    assert out.count("warning: training in bf16 as asked") == 1
    assert "train.precision: auto" in out
    assert "bf16 is not native here" in out or "has no AVX-512 bf16 or AMX instructions" in out
    assert out.index("warning: training in bf16") < out.index("step 3/3")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"]["precision"] == "bf16" and not summary["precision"]["native_bf16"]


@pytest.mark.slow
def test_resolved_precision_is_recorded_and_kept_on_resume(data_cache, tmp_path):
    """Started where bf16 is slow (auto -> fp32), resumed where it may be fast: the run stays fp32, bitwise."""
    env = SLOW_BF16 | {"RAMPUP_CACHE_DIR": str(tmp_path / "cache")}
    cfg = write_config(tmp_path / "run.yaml", tiny_tree(data_cache, tmp_path / "run"))
    res = run_rampup("train", str(cfg), env_extra=env)
    assert res.returncode == 0, res.stderr
    assert "precision fp32 (auto: " in res.stdout
    run = tmp_path / "run"
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["event"] == "run" and first["precision"]["precision"] == "fp32"
    state = json.loads((run / "checkpoints" / "step_0000020" / "state.json").read_text())
    assert state["precision"]["precision"] == "fp32" and state["precision"]["requested"] == "auto"
    assert json.loads((run / "summary.json").read_text())["precision"]["precision"] == "fp32"

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for step in ("step_0000030", "step_0000040"):
        shutil.rmtree(resumed / "checkpoints" / step)
    tree = yaml.safe_load(cfg.read_text()) | {}
    tree["train"]["out_dir"] = str(resumed)
    cfg2 = write_config(tmp_path / "resumed.yaml", tree)
    res = run_rampup("train", str(cfg2), "--resume", env_extra={"RAMPUP_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "precision fp32" in res.stdout and "kept from the run's start" in res.stdout
    assert weights(resumed) == weights(run)
    assert step_losses(resumed) == step_losses(run)
    assert json.loads((resumed / "summary.json").read_text())["precision"]["precision"] == "fp32"
