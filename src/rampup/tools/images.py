"""An image run from its config (``images:``): the prepared images, the sampler, the classifier and the task
handed to the unchanged engine, and its plan (FLOPs per stage from the model at each size). See
docs/vision.md."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensorMode

from rampup.config import RunConfig
from rampup.data.images import ImageDataset, ImageSampler, eval_batches, images_dir, prepare_images
from rampup.engine.checkpoint.format import load_checkpoint
from rampup.engine.optim import build_optimizer
from rampup.engine.rundata import RunData
from rampup.engine.runs import check_new_folder, new_folder, read_run
from rampup.engine.step import optimizer_step
from rampup.errors import ConfigError, DataError
from rampup.knobs.ema import load_ema_weights
from rampup.knobs.image import longest_image
from rampup.knobs.memory import MemoryEstimate, traced_step
from rampup.knobs.subnets import parse_export
from rampup.knobs.transitions import uses_parameter_groups
from rampup.models.vision import (
    ImageClassification,
    ImageClassifierAdapter,
    ResNet,
    VisionConfig,
    check_patch,
    extract_subnetwork,
)
from rampup.schedule.registry import check_knobs, graph_id
from rampup.schedule.shapes import ImageShape
from rampup.schedule.stages import Schedule
from rampup.seeding import untouched_rng
from rampup.units import format_bytes, format_tokens


@dataclass
class ImageRun:
    """What ``rampup.engine.trainer.train`` takes for an image run."""

    data: RunData
    task: ImageClassification
    channels: int
    classes: int

    def build_model(self, cfg: Any, device: torch.device) -> ImageClassifierAdapter:
        return build_classifier(cfg, self.channels, self.classes, device)


def classifier_config(cfg: RunConfig, channels: int, classes: int) -> VisionConfig:
    """``images.model`` completed by the run: the images' channels and classes, the largest image_size."""
    assert cfg.images is not None
    return cfg.images.model.model_copy(
        update={"channels": channels, "classes": classes, "base_size": longest_image(cfg.schedule)}
    )


def build_classifier(
    cfg: RunConfig, channels: int, classes: int, device: torch.device | str = "cpu"
) -> ImageClassifierAdapter:
    model = classifier_config(cfg, channels, classes)
    if str(device) == "meta":
        with torch.device("meta"):
            return ImageClassifierAdapter(model.build())
    return ImageClassifierAdapter(model.build().to(device), fresh=model.build)


def image_schedule(cfg: RunConfig) -> Schedule:
    vit = cfg.images is not None and cfg.images.model.arch == "vit"
    shape = ImageShape(multiple=cfg.images.model.patch if cfg.images is not None and vit else 4)
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, shape=shape)
    if cfg.images is not None and vit:
        for size in {int(sp.knobs["image_size"]) for sp in schedule.steps()}:
            check_patch(size, cfg.images.model.patch)
    check_knobs(cfg, schedule)  # every knob's plan-time checks (a sub-network within the ResNet ...)
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


def image_step_memory(
    cfg: RunConfig, channels: int, classes: int, rows: int, size: int, precision: str
) -> MemoryEstimate:
    """Peak tensor memory of one engine step of ``rows`` images of ``size`` pixels, traced on fake tensors
    (nothing allocated): weights, AdamW state, gradients and activations, every parameter trainable."""
    task = ImageClassification()
    with FakeTensorMode(allow_non_fake_inputs=True), untouched_rng():
        adapter = ImageClassifierAdapter(classifier_config(cfg, channels, classes).build())
        adapter.module.train()
        optimizer = build_optimizer(adapter.module, cfg.optimizer, uses_parameter_groups(cfg.schedule))
        x, y = torch.zeros(rows, channels, size, size), torch.zeros(rows, dtype=torch.long)
        return traced_step(cfg, adapter, optimizer, task, task.make_batch(x, y), precision)


def image_step_seconds(
    cfg: RunConfig, channels: int, classes: int, shapes: list[tuple[int, int]], precision: str, repeats: int = 3
) -> dict[tuple[int, int], float]:
    """Seconds per step of each (rows, size), on this machine: real steps of the run's model (random weights
    and images; one warm-up step, then the median of ``repeats``) at the cheapest and the costliest shape,
    the others on the line through them in FLOPs per step (a step's time is nearly linear in its FLOPs)."""
    task = ImageClassification()
    with untouched_rng():
        adapter = build_classifier(cfg, channels, classes)
        optimizer = build_optimizer(adapter.module, cfg.optimizer, uses_parameter_groups(cfg.schedule))

    def flops(shape: tuple[int, int]) -> float:
        return shape[0] * adapter.flops_per_item((channels, shape[1], shape[1]))

    def measure(shape: tuple[int, int]) -> float:
        rows, size = shape
        batch = task.make_batch(torch.randn(rows, channels, size, size), torch.randint(0, classes, (rows,)))
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            optimizer_step(adapter, task, optimizer, batch, lr=0.0, precision=precision, micro_batch_items=None)
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    lo, hi = min(shapes, key=flops), max(shapes, key=flops)
    t_lo, t_hi = measure(lo), measure(hi) if hi != lo else None
    if t_hi is None or flops(hi) == flops(lo):
        return {s: t_lo for s in shapes}
    slope = (t_hi - t_lo) / (flops(hi) - flops(lo))
    return {s: max(0.0, t_lo + slope * (flops(s) - flops(lo))) for s in shapes}


def plan_images(
    cfg: RunConfig, channels: int = 3, classes: int = 10, *, precision: str = "fp32", timing: bool = False
) -> tuple[Table, dict[str, Any]]:
    """Each stage's steps, images, sizes, batch, training FLOPs (the model counted at each size) and peak
    memory (a traced step at its costliest shape), and with ``timing`` its predicted time (steps measured on
    this machine), against a baseline at the largest size for the same images."""
    schedule = image_schedule(cfg)
    adapter = build_classifier(cfg, channels, classes, "meta")
    longest = longest_image(cfg.schedule)
    full = adapter.flops_per_item((channels, longest, longest))
    stages: list[dict[str, Any]] = [
        {"name": s.name, "steps": 0, "images": 0, "sizes": set(), "batches": set(), "flops": 0.0, "shapes": {}}
        for s in schedule.stages
    ]
    for sp in schedule.steps():
        st, size = stages[sp.stage], int(sp.knobs["image_size"])
        st["steps"] += 1
        st["images"] += sp.batch_size
        st["sizes"].add(size)
        st["batches"].add(sp.batch_size)
        st["flops"] += sp.batch_size * adapter.flops_per_item((channels, size, size))
        st["shapes"][(sp.batch_size, size)] = st["shapes"].get((sp.batch_size, size), 0) + 1
    base_rows = int(cfg.schedule.knobs.get("batch_size") or max(b for s in stages for b in s["batches"]))
    base_steps = -(-schedule.total_tokens // base_rows)
    every = {sh for s in stages for sh in s["shapes"]} | {(base_rows, longest)}
    seconds = image_step_seconds(cfg, channels, classes, sorted(every), precision) if timing else {}
    for s in stages:
        costliest = max(s["shapes"], key=lambda sh: sh[0] * sh[1] * sh[1])
        rows, size = costliest
        s["memory"] = image_step_memory(cfg, channels, classes, rows, size, precision).as_dict()
        if timing:
            s["seconds"] = sum(n * seconds[sh] for sh, n in s["shapes"].items())
    total = sum(s["flops"] for s in stages)
    summary = {
        "total_images": schedule.total_tokens,
        "total_flops": total,
        "baseline_flops": full * schedule.total_tokens,
        "flops_saved": 1 - total / (full * schedule.total_tokens),
        "precision": precision,
        "stages": [
            {
                **{k: v for k, v in s.items() if k != "shapes"},
                "sizes": sorted(s["sizes"]),
                "batches": sorted(s["batches"]),
            }
            for s in stages
        ],
    }
    if timing:
        summary["seconds"] = sum(s["seconds"] for s in stages)
        summary["baseline_seconds"] = base_steps * seconds[(base_rows, longest)]
    return _plan_table(cfg, schedule, stages, total, timing), summary


def _plan_table(cfg: RunConfig, schedule: Schedule, stages: list[dict[str, Any]], total: float, timing: bool) -> Table:
    t = Table(title=f"plan: {cfg.name} ({schedule.total_tokens:,} images, {sum(s['steps'] for s in stages)} steps)")
    cols = ["stage", "steps", "images", "image_size", "batch", "FLOPs", "share", "peak memory"]
    for col in cols + (["time"] if timing else []):
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
            format_bytes(s["memory"]["peak"]),
            *([f"{s['seconds']:.0f} s"] if timing else []),
        )
    return t


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_classifier(
    path: str | Path, out_dir: str | Path, *, dtype: str = "float32", ema: bool = False, subnet: str | None = None
) -> Path:
    """An image run's checkpoint (a run folder: its latest) as a folder of its own: ``model.safetensors``
    and ``config.yaml`` (the classifier's ``images.model``, the class names, the training split's mean and
    std), loaded by :func:`load_classifier`. ``subnet``: ``depth=D,mlp=F``, the ResNet sub-network of D
    blocks per stage and F of each block's inner channels (Once-for-All), written as a smaller ResNet."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    out = Path(out_dir)
    check_new_folder(out)
    saved = read_run(path, "rampup export")
    cfg = RunConfig.model_validate(saved.config)
    assert cfg.images is not None
    channels, classes, known = prepared_shape(cfg)
    if not known:
        raise DataError(f"the run's images ({cfg.images.source}) are not prepared here: `rampup prepare` its config")
    meta = json.loads((images_dir(cfg.images.prepare(cfg.data)) / "meta.json").read_text())
    vc = classifier_config(cfg, channels, classes)
    module = vc.build()
    ck = load_checkpoint(saved.checkpoint, module, None)  # verifies the manifest: a damaged one is refused
    if ema:  # the averaged weights (and statistics) instead of the raw ones
        load_ema_weights(module, ck.part_tensors, str(saved.checkpoint))
    if subnet is not None:
        depth, frac = parse_export(subnet)
        widest = module.widest if isinstance(module, ResNet) else 0
        vc, module = extract_subnetwork(vc, module, depth, max(1, round(frac * widest)))
    info = {
        "images": {"model": vc.model_dump()},
        "classes": meta["classes"],
        "mean": meta["mean"],
        "std": meta["std"],
        "from": str(saved.checkpoint),
    }
    with new_folder(out) as tmp:
        state = {
            k: v.detach().to(EXPORT_DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous()
            for k, v in module.state_dict().items()
        }
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    return out


def load_classifier(folder: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A classifier written by :func:`export_classifier` (weights in float32) and its config.yaml."""
    p = Path(folder)
    if not (p / "config.yaml").is_file() or not (p / "model.safetensors").is_file():
        raise ConfigError(f"{p} holds no exported classifier (config.yaml and model.safetensors)")
    info = yaml.safe_load((p / "config.yaml").read_text())
    module = VisionConfig.model_validate(info["images"]["model"]).build()
    module.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(p / "model.safetensors")).items()}
    )
    return module, info
