"""Stage transitions on an image run, as on a language model's: a snapshot teacher of the previous
resolution stage and the EMA (batch-norm statistics averaged too), exact resume across the stage that
takes the snapshot, the ResNet's Once-for-All sub-networks taught by the full network, and multigrid's
short cycle with the lr following the long cycle only. Runs from config trees through rampup.tools.images,
as `rampup train` runs them."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import png_folder
from rampup.config import RunConfig
from rampup.engine.checkpoint.format import latest_checkpoint
from rampup.engine.records import read_metrics
from rampup.engine.trainer import train
from rampup.errors import ConfigError
from rampup.tools.export import export_hf
from rampup.tools.images import image_run, load_classifier


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return png_folder(tmp_path_factory.mktemp("pngs"), classes=3, per_class=12)


def tree(pngs: Path, out: Path, stages: list[dict], knobs: dict | None = None, **train_extra) -> dict:
    return {
        "name": out.name,
        "images": {"source": str(pngs), "resolution": 32, "model": {"widths": [8, 16], "depths": [2, 2]}},
        "data": {"cache_dir": str(out.parent / "cache"), "val_fraction": 0.25},
        "schedule": {"knobs": {"batch_size": 8, **(knobs or {})}, "stages": stages},
        "optimizer": {"lr": 3e-3, "warmup": "5%"},
        "train": {
            "duration": "192 samples",
            "checkpoint_every": "25%",
            "out_dir": str(out),
            "precision": "fp32",
            **train_extra,
        },
        "eval": {"seq_lens": [32], "every": "50%", "max_tokens": 32},
        "log": {"progress": "off"},
    }


def run(t: dict, resume: bool = False) -> dict:
    cfg = RunConfig.model_validate(t)
    r = image_run(cfg)
    return train(cfg, resume=resume, build_model=r.build_model, task=r.task, data=r.data)


def steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]


SMALL = {"name": "small", "duration": "50%", "image_size": 16}
TAUGHT = {"name": "full", "image_size": 32, "teacher": "previous_stage", "distill_weight": 0.5, "label_weight": 0.5}


def test_a_previous_stage_teacher_and_the_ema_on_an_image_run_resume_bitwise(pngs, tmp_path):
    ema = {"ema": {"half_life": "64 samples"}}
    run(tree(pngs, tmp_path / "plain", [SMALL, {"name": "full", "image_size": 32}], **ema))
    run(tree(pngs, tmp_path / "taught", [SMALL, TAUGHT], **ema))
    plain, taught = steps(tmp_path / "plain"), steps(tmp_path / "taught")
    assert [r["loss"] for r in plain[:12]] == [r["loss"] for r in taught[:12]]  # the same run until the teacher
    assert all(a["loss"] != b["loss"] for a, b in zip(plain[12:], taught[12:], strict=True))
    last = latest_checkpoint(tmp_path / "taught" / "checkpoints")
    with safe_open(str(last / "parts.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "ema/blocks.0.bn1.running_mean" in names  # the average has statistics of its own
    assert any(n.startswith("teachers/") and "small" in n for n in names)  # the snapshot, saved for a resume
    # resume from the checkpoint after the snapshot was taken (step 18): the snapshot comes back from it
    shutil.copytree(tmp_path / "taught", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000024")
    run(tree(pngs, tmp_path / "resumed", [SMALL, TAUGHT], **ema), resume=True)
    assert [r["loss"] for r in steps(tmp_path / "resumed")] == [r["loss"] for r in taught]
    assert (latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "model.safetensors").read_bytes() == (
        last / "model.safetensors"
    ).read_bytes()


def test_resnet_subnetworks_train_with_the_full_network_as_teacher(pngs, tmp_path):
    stages = [
        {"name": "full", "duration": "50%", "image_size": 32},
        {"name": "shrink", "subnet": "depth:1-2,mlp:0.5-1.0"},
    ]
    run(tree(pngs, tmp_path / "ofa", stages, {"image_size": 32}))
    run(tree(pngs, tmp_path / "plain", stages[:1] + [{"name": "shrink"}], {"image_size": 32}))
    ofa, plain = steps(tmp_path / "ofa"), steps(tmp_path / "plain")
    assert [r["loss"] for r in ofa[:12]] == [r["loss"] for r in plain[:12]]
    # the first sub-network step starts from the same weights: its loss is the same CE plus the sub-network's KL
    assert ofa[12]["loss"] > plain[12]["loss"]
    assert all(a["loss"] != b["loss"] for a, b in zip(ofa[13:], plain[13:], strict=True))
    # export the whole network and one sub-network; the sub-network computes what it did inside the whole
    export_hf(tmp_path / "ofa", tmp_path / "whole")
    export_hf(tmp_path / "ofa", tmp_path / "sub", subnet="depth=1,mlp=0.5", dtype="float32")
    whole, info = load_classifier(tmp_path / "whole")
    sub, sub_info = load_classifier(tmp_path / "sub")
    assert info["classes"] == ["class_0", "class_1", "class_2"] and sub_info["images"]["model"]["depths"] == [1, 1]
    x = torch.randn(4, 3, 32, 32)
    whole.eval().active_depth, whole.active_hidden = 1, 8
    assert torch.allclose(sub.eval().head(sub.features(x)), whole.head(whole.features(x)), atol=1e-5)
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_hf(tmp_path / "ofa", tmp_path / "sub")
    with pytest.raises(ConfigError, match="deepest stage has 2 blocks"):
        run(tree(pngs, tmp_path / "deep", [{"name": "s", "image_size": 32, "subnet": "depth:1-3,mlp:0.5-1.0"}]))
    vit = tree(pngs, tmp_path / "vit", [{"name": "s", "image_size": 32, "subnet": "depth:1-2,mlp:0.5-1.0"}])
    vit["images"]["model"] = {"arch": "vit", "patch": 8, "dim": 32, "depth": 2, "heads": 4}
    with pytest.raises(ConfigError, match="sub-networks are built for the ResNet, not a vit"):
        run(vit)
    assert not (tmp_path / "vit" / "checkpoints").exists()


def test_the_short_cycle_shapes_consecutive_steps_and_the_lr_follows_the_long_cycle(pngs, tmp_path):
    knobs = {"batch_scale": "multigrid", "lr_scale": "linear", "short_cycle": "multigrid"}
    stages = [{"name": "half", "duration": "50%", "image_size": 16}, {"name": "full", "image_size": 32}]
    t = tree(pngs, tmp_path / "mg", stages, knobs)
    t["train"]["duration"] = "384 samples"
    t["optimizer"] = {"lr": 3e-3, "warmup": "0%", "decay": "constant"}
    run(t)
    recs = steps(tmp_path / "mg")
    for i, r in enumerate(recs):  # step i of the run: factor 1/2, 1/sqrt(2), 1 of its stage's size (multiples of 4)
        base = 16 if r["stage"] == 0 else 32
        size = max(4, int(base * (0.5, 0.5**0.5, 1.0)[i % 3]) // 4 * 4)
        assert r["batch_size"] == 8 * 32 * 32 // (size * size)  # batch x H x W constant
        assert r["lr"] == pytest.approx(3e-3 * (32 / base) ** 2)  # the long cycle's batch sets the lr, not the short
    assert [r["batch_size"] for r in recs] == [128, 128, 8, 32, 20, 8, 32, 20, 8]


def test_a_compiled_image_run_makes_one_graph_per_shape(pngs, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    t = tree(pngs, tmp_path / "compiled", [SMALL, {"name": "full", "image_size": 32}])
    t["train"].update(compile=True, compile_backend="eager", checkpoint_every=None)
    run(t)
    recs = steps(tmp_path / "compiled")
    assert {r["seq_len"] for r in recs} == {1} and len(recs) == 24
    # 16 and 32 pixels, 8 images each (evaluation runs the plain forward, as a language model's does)
    assert counters["stats"]["unique_graphs"] == 2
    assert sum(1 for r in recs if r.get("compiled")) == 2


def test_two_ranks_train_a_vit_image_run_as_one_rank_does(pngs, tmp_path):
    from conftest import run_rampup, write_config

    def vit(out: Path) -> dict:
        t = tree(pngs, out, [SMALL, {"name": "full", "image_size": 32}])
        t["images"]["model"] = {"arch": "vit", "patch": 8, "dim": 32, "depth": 2, "heads": 4}
        t["train"].update(threads=1, duration="96 samples")
        return t

    for n in (1, 2):
        cfg = write_config(tmp_path / f"r{n}.yaml", vit(tmp_path / f"r{n}"))
        res = run_rampup("train", str(cfg), *(("--nproc", "2") if n == 2 else ()))
        assert res.returncode == 0, res.stderr[-3000:]
    one, two = steps(tmp_path / "r1"), steps(tmp_path / "r2")
    assert [r["batch_size"] for r in two] == [r["batch_size"] for r in one] == [8] * 12  # the global batch
    # each rank takes half of every step's images; the averaged gradients give the one-rank step
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
