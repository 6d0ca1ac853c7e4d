"""An image classifier trained through the engine unchanged: progressive resizing and multigrid batches
over a generated PNG folder, with the step shapes the schedule plans, the lr scaled with the batch, and a
bitwise resume across a resolution stage."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import png_folder
from rampup.config import RunConfig
from rampup.data.images import ImageDataset, ImagePrepare, ImageSampler, eval_batches, prepare_images
from rampup.engine.checkpoint.format import latest_checkpoint
from rampup.engine.records import read_metrics
from rampup.engine.trainer import RunData, train
from rampup.errors import ConfigError, DataError
from rampup.models.vision import ImageClassification, ImageClassifierAdapter, VisionConfig
from rampup.schedule.shapes import ImageShape
from rampup.schedule.stages import Schedule


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = png_folder(tmp_path_factory.mktemp("pngs"), classes=3, per_class=16)
    return prepare_images(
        ImagePrepare(str(root), resolution=32, val_fraction=0.25, cache_dir=str(tmp_path_factory.mktemp("c")))
    )


def config(out: Path, stages: list[dict], duration: str = "24 steps", **knobs) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "images",
            "schedule": {"knobs": {"batch_size": 8, "crop_scale": 0.5, **knobs}, "stages": stages},
            "optimizer": {"lr": 3e-3, "warmup": "5%"},
            "train": {"duration": duration, "checkpoint_every": "25%", "out_dir": str(out), "precision": "fp32"},
            "eval": {"every": "50%"},
            "log": {"progress": "off"},
        }
    )


def run(cfg: RunConfig, prepared: Path, arch: str = "resnet", resume: bool = False):
    made = []

    def build(cfg, device):
        torch.manual_seed(cfg.train.seed)
        vc = VisionConfig(
            arch=arch,
            channels=3,
            classes=3,
            widths=(8, 16),
            depths=(1, 1),
            dim=32,
            depth=2,
            heads=4,
            patch=8,
            base_size=32,
        )
        made.append(ImageClassifierAdapter(vc.build().to(device)))
        return made[0]

    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, shape=ImageShape())
    data = RunData(
        schedule,
        ImageSampler(ImageDataset(prepared, "train"), cfg.train.seed),
        eval_sets={32: eval_batches(ImageDataset(prepared, "val"), 32, 64)},
    )
    return train(cfg, resume=resume, build_model=build, task=ImageClassification(), data=data), schedule


def steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]


PROGRESSIVE = [{"name": "small", "duration": "50%", "image_size": 16}, {"name": "full", "image_size": 32}]


def test_progressive_resizing_trains_at_the_planned_shapes_and_resumes_bitwise(prepared, tmp_path):
    summary, schedule = run(config(tmp_path / "full", PROGRESSIVE), prepared)
    recs = steps(tmp_path / "full")
    assert [r["batch_size"] for r in recs] == [sp.batch_size for sp in schedule.steps()] == [8] * 24
    assert summary["tokens"] == 24 * 8  # progress counts images
    flops = [r["flops"] for r in recs]
    assert flops[12] > 3.5 * flops[0]  # a 32-pixel step costs about 4x a 16-pixel one
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for step in ("step_0000018", "step_0000024"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
    resumed, _ = run(config(tmp_path / "resumed", PROGRESSIVE), prepared, resume=True)
    assert [r["loss"] for r in steps(tmp_path / "resumed")] == [r["loss"] for r in recs]
    assert (latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "model.safetensors").read_bytes() == (
        latest_checkpoint(tmp_path / "full" / "checkpoints") / "model.safetensors"
    ).read_bytes()
    assert resumed["val_loss"] == summary["val_loss"]


def test_multigrid_keeps_pixels_per_step_and_scales_the_lr_linearly(prepared, tmp_path):
    cfg = config(tmp_path / "mg", PROGRESSIVE, duration="512 samples", batch_scale="multigrid", lr_scale="linear")
    summary, schedule = run(cfg, prepared)
    recs = steps(tmp_path / "mg")
    assert [r["batch_size"] for r in recs] == [32] * 8 + [8] * 32  # 16 px: 4x the images of 32 px
    assert summary["tokens"] == 512
    assert recs[7]["lr"] / recs[8]["lr"] == pytest.approx(4.0, rel=0.05)  # the cosine barely moves in one step


def test_a_vit_resolution_stage_and_knobs_an_image_model_cannot_take(prepared, tmp_path):
    summary, _ = run(config(tmp_path / "vit", PROGRESSIVE), prepared, arch="vit")
    assert summary["steps"] == 24
    with pytest.raises(ConfigError, match="knob 'rope'.*cannot honour"):
        run(
            config(tmp_path / "bad", [{"name": "a", "image_size": 32, "rope": {"method": "pi", "factor": 2}}]), prepared
        )


# ----------------------------------------------------------------------------- from YAML, through the CLI
def image_tree(folder: Path, out: Path, cache: Path, arch: str = "resnet") -> dict:
    return {
        "name": "pngs",
        "images": {
            "source": str(folder),
            "resolution": 32,
            "model": {"arch": arch, "widths": [8, 16], "depths": [1, 1], "patch": 8, "dim": 32, "depth": 2, "heads": 4},
        },
        "data": {"cache_dir": str(cache), "val_fraction": 0.25},
        "schedule": {
            "knobs": {"batch_size": 8},
            "stages": [{"name": "small", "duration": "50%", "image_size": 16}, {"name": "full", "image_size": 32}],
        },
        "optimizer": {"lr": 3e-3, "warmup": "5%"},
        "train": {"duration": "192 samples", "checkpoint_every": "50%", "out_dir": str(out), "threads": 1},
        "eval": {"seq_lens": [32], "every": "50%", "max_tokens": 64},
        "log": {"progress": "plain"},
    }


def test_rampup_train_and_plan_take_an_image_run_from_yaml(tmp_path):
    from conftest import run_rampup, write_config

    folder = png_folder(tmp_path / "pngs", classes=3, per_class=8)
    cfg = write_config(tmp_path / "run.yaml", image_tree(folder, tmp_path / "run", tmp_path / "cache"))
    res = run_rampup("plan", str(cfg))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "small" in res.stdout and "saves" in res.stdout
    res = run_rampup("train", str(cfg))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "24 steps, 192 images" in res.stdout  # the schedule's unit, not "tokens"
    recs = steps(tmp_path / "run")
    assert len(recs) == 24 and {r["batch_size"] for r in recs} == {8}
    assert (tmp_path / "run" / "checkpoints").is_dir()


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda t: t["images"]["model"].update(arch="vit") or t["schedule"]["stages"][0].update(image_size=12),
            "does not keep to the ViT's patch 8",
        ),
        (lambda t: t["schedule"]["stages"][1].update(rope={"method": "pi", "factor": 2}), "knob 'rope'"),
        (lambda t: t["schedule"]["knobs"].update(batch_size=0), "needs batch_size > 0"),
        (lambda t: t["schedule"]["stages"][1].update(image_size=64), "raise images.resolution to 64"),
    ],
)
def test_bad_image_runs_are_named_before_compute(tmp_path, change, words):
    from rampup.config import RunConfig
    from rampup.tools.images import image_run

    folder = png_folder(tmp_path / "pngs", classes=2, per_class=4)
    tree = image_tree(folder, tmp_path / "run", tmp_path / "cache")
    change(tree)
    with pytest.raises((ConfigError, ValueError), match=words):
        cfg = RunConfig.model_validate(tree)
        run = image_run(cfg)
        train(cfg, build_model=run.build_model, task=run.task, data=run.data)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluation_records_accuracy_and_compare_measures_time_to_the_baselines_error(prepared, tmp_path):
    from rampup.tools.compare import compare_runs

    run(config(tmp_path / "progressive", PROGRESSIVE), prepared)
    base = config(tmp_path / "baseline", [{"name": "full", "image_size": 32}])
    base.name = "baseline"
    run(base, prepared)
    evals = [r for r in read_metrics(tmp_path / "baseline" / "metrics.jsonl") if r["event"] == "eval"]
    assert evals and all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    # the recorded accuracy is the final weights' on the validation images, counted again here
    from rampup.engine.checkpoint.format import load_checkpoint
    from rampup.protocols import Batch

    vc = VisionConfig(arch="resnet", channels=3, classes=3, widths=(8, 16), depths=(1, 1))
    model = ImageClassifierAdapter(vc.build())
    load_checkpoint(latest_checkpoint(tmp_path / "baseline" / "checkpoints"), model.module, None)
    model.module.eval()
    val = eval_batches(ImageDataset(prepared, "val"), 32, 64)
    with torch.no_grad():
        hits = sum(ImageClassification().correct(model, Batch(x, y, {})) for x, y in val)
    assert evals[-1]["accuracy"] == pytest.approx(hits / sum(len(y) for _, y in val))
    result = compare_runs([tmp_path / "progressive", tmp_path / "baseline"], metric="error")
    assert result["metric"] == "error"
    assert result["targets"]["32"] == pytest.approx(1.0 - evals[-1]["accuracy"])
    base_row = next(g for g in result["groups"] if g["baseline"])
    assert base_row["lengths"]["32"]["final_loss"]["median"] == pytest.approx(1.0 - evals[-1]["accuracy"])
    # a run without accuracy (a language model's) cannot be compared on error: the same run, accuracy removed
    (tmp_path / "text").mkdir()
    with pytest.raises(DataError, match="recorded no accuracy"):
        (tmp_path / "text" / "config.yaml").write_text((tmp_path / "baseline" / "config.yaml").read_text())
        lines = read_metrics(tmp_path / "baseline" / "metrics.jsonl")
        for r in lines:
            r.pop("accuracy", None)
        (tmp_path / "text" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        compare_runs([tmp_path / "text", tmp_path / "baseline"], metric="error")
