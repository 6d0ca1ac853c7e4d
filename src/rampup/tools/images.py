"""An image run from its config (``images:``): the prepared images, the sampler, the classifier and the task
handed to the unchanged engine, and its plan (FLOPs per stage from the model at each size). See
docs/vision.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from rich.table import Table

from rampup.config import RunConfig
from rampup.data.images import ImageDataset, ImageSampler, eval_batches, images_dir, prepare_images
from rampup.engine.rundata import RunData
from rampup.errors import ConfigError, DataError
from rampup.knobs.image import longest_image
from rampup.models.vision import ImageClassification, ImageClassifierAdapter, check_patch
from rampup.schedule.registry import graph_id
from rampup.schedule.shapes import ImageShape
from rampup.schedule.stages import Schedule
from rampup.units import format_tokens


@dataclass
class ImageRun:
    """What ``rampup.engine.trainer.train`` takes for an image run."""

    data: RunData
    task: ImageClassification
    channels: int
    classes: int

    def build_model(self, cfg: Any, device: torch.device) -> ImageClassifierAdapter:
        return build_classifier(cfg, self.channels, self.classes, device)


def build_classifier(
    cfg: RunConfig, channels: int, classes: int, device: torch.device | str = "cpu"
) -> ImageClassifierAdapter:
    assert cfg.images is not None
    model = cfg.images.model.model_copy(
        update={"channels": channels, "classes": classes, "base_size": longest_image(cfg.schedule)}
    )
    if str(device) == "meta":
        with torch.device("meta"):
            return ImageClassifierAdapter(model.build())
    return ImageClassifierAdapter(model.build().to(device))


def image_schedule(cfg: RunConfig) -> Schedule:
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, shape=ImageShape())
    if cfg.images is not None and cfg.images.model.arch == "vit":
        for size in {int(sp.knobs["image_size"]) for sp in schedule.steps()}:
            check_patch(size, cfg.images.model.patch)
    return schedule


def image_run(cfg: RunConfig) -> ImageRun:
    """Prepare the images (once, cached) and build the run's data: everything checked before compute."""
    if cfg.images is None:
        raise ConfigError("image_run needs a config with an images section")
    folder = prepare_images(cfg.images.prepare(cfg.data))
    train, val = ImageDataset(folder, "train"), ImageDataset(folder, "val")
    schedule = image_schedule(cfg)
    sizes = cfg.eval.seq_lens or [longest_image(cfg.schedule)]
    eval_sets = {n: eval_batches(val, n, cfg.eval.max_tokens) for n in sizes}
    shapes = [(sp.batch_size, 1) for sp in schedule.steps()]
    channels = int(train.meta["channels"])
    graphs = {
        graph_id(sp.knobs, (sp.batch_size, channels, sp.knobs["image_size"], sp.knobs["image_size"]))
        for sp in schedule.steps()
    }
    data = RunData(
        schedule,
        ImageSampler(train, cfg.train.seed),
        eval_sets,
        graphs,
        train,
        val,
        None,
        shapes,
        set(shapes),
    )
    return ImageRun(data, ImageClassification(), int(train.meta["channels"]), len(train.classes))


def prepared_shape(cfg: RunConfig) -> tuple[int, int, bool]:
    """(channels, classes, whether known) of the run's images: from their prepared folder when there is one
    (a plan never prepares), else 3 and 10."""
    assert cfg.images is not None
    try:
        meta = images_dir(cfg.images.prepare(cfg.data)) / "meta.json"
    except DataError:  # a source not on this machine: planned all the same
        return 3, 10, False
    if not meta.is_file():
        return 3, 10, False
    m = json.loads(meta.read_text())
    return int(m["channels"]), len(m["classes"]), True


def plan_images(cfg: RunConfig, channels: int = 3, classes: int = 10) -> tuple[Table, dict[str, Any]]:
    """Each stage's steps, images, sizes, batch and training FLOPs (the model counted at each size), against
    a baseline at the largest size for the same images."""
    schedule = image_schedule(cfg)
    adapter = build_classifier(cfg, channels, classes, "meta")
    longest = longest_image(cfg.schedule)
    full = adapter.flops_per_item((channels, longest, longest))
    stages: list[dict[str, Any]] = [
        {"name": s.name, "steps": 0, "images": 0, "sizes": set(), "batches": set(), "flops": 0.0}
        for s in schedule.stages
    ]
    for sp in schedule.steps():
        st, size = stages[sp.stage], int(sp.knobs["image_size"])
        st["steps"] += 1
        st["images"] += sp.batch_size
        st["sizes"].add(size)
        st["batches"].add(sp.batch_size)
        st["flops"] += sp.batch_size * adapter.flops_per_item((channels, size, size))
    total = sum(s["flops"] for s in stages)
    baseline = full * schedule.total_tokens
    t = Table(title=f"plan: {cfg.name} ({schedule.total_tokens:,} images, {sum(s['steps'] for s in stages)} steps)")
    for col in ("stage", "steps", "images", "image_size", "batch", "FLOPs", "share"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for i, s in enumerate(stages):
        sizes, batches = sorted(s["sizes"]), sorted(s["batches"])
        t.add_row(
            f"{i} {s['name']}",
            str(s["steps"]),
            format_tokens(s["images"]),
            f"{sizes[0]}..{sizes[-1]}" if len(sizes) > 1 else str(sizes[0]),
            f"{batches[0]}..{batches[-1]}" if len(batches) > 1 else str(batches[0]),
            f"{s['flops']:.3g}",
            f"{s['flops'] / total:.1%}",
        )
    summary = {
        "total_images": schedule.total_tokens,
        "total_flops": total,
        "baseline_flops": baseline,
        "flops_saved": 1 - total / baseline,
        "stages": [{**s, "sizes": sorted(s["sizes"]), "batches": sorted(s["batches"])} for s in stages],
    }
    return t, summary
