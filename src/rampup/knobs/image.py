"""The image-shape family: ``image_size`` (pixels per side of a training image), ``batch_size`` (images per
step at the run's largest size), ``batch_scale`` (``constant``, or ``multigrid``: batch x H x W kept
constant, Wu et al. 2020), ``lr_scale`` (the learning rate scaled with the step's batch: ``none``,
``linear`` as multigrid does, ``sqrt``) and ``crop_scale`` (the smallest area a random resized crop
keeps). The mechanism is rampup.data.images (the sampler reads image_size and crop_scale each step) and
rampup.schedule.shapes.ImageShape (rows per step). See docs/vision.md."""

from __future__ import annotations

import math
from typing import Any

from rampup.schedule.ramps import Ramp
from rampup.schedule.registry import Knob, KnobContext, register_knob
from rampup.schedule.shapes import ImageShape


def _check_choice(name: str, choices: tuple[str, ...]) -> Any:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"knob '{name}' takes one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


IMAGE_KNOBS = ("image_size", "batch_size", "batch_scale", "lr_scale", "crop_scale", "short_cycle")
"""The family's knobs: an image task's; a language model refuses them (their defaults mean "not an image run")."""


def longest_image(schedule_cfg: Any) -> int:
    """The largest image_size a schedule config sets (constants and ramp ends): the run's base shape."""
    values = [schedule_cfg.knobs.get("image_size")] + [st.knobs.get("image_size") for st in schedule_cfg.stages]
    tops = [max(v.start, v.to) if isinstance(v, Ramp) else v for v in values if v is not None]
    return int(max(tops, default=0))


def _values(schedule_cfg: Any, name: str) -> list[Any]:
    return [
        v for v in [schedule_cfg.knobs.get(name)] + [st.knobs.get(name) for st in schedule_cfg.stages] if v is not None
    ]


def _check_images(cfg: Any) -> None:
    """An image run sets its sizes and batch; each size within the cached resolution and, for a ViT, a
    multiple of the patch (a ramp rounds to a multiple of it)."""
    images = getattr(cfg, "images", None)
    if images is None:  # a language model refuses image knobs when it is built (it does not support them)
        return
    for name in ("image_size", "batch_size"):
        first = cfg.schedule.knobs.get(name, cfg.schedule.stages[0].knobs.get(name) if cfg.schedule.stages else None)
        if not first:
            raise ValueError(f"an image run needs {name} > 0 from its first step: set schedule.knobs.{name}")
    longest = longest_image(cfg.schedule)
    if longest > images.resolution:
        raise ValueError(
            f"image_size reaches {longest} but images.resolution is {images.resolution} (the size the images "
            f"are cached at): raise images.resolution to {longest} or lower image_size"
        )
    if images.model.arch == "vit":
        patch = images.model.patch
        for v in _values(cfg.schedule, "image_size"):
            ends = [v.start, v.to] if isinstance(v, Ramp) else [v]
            step = (v.multiple_of or 4) if isinstance(v, Ramp) else patch
            if any(int(e) % patch for e in ends) or step % patch:
                raise ValueError(
                    f"image_size {v.describe() if isinstance(v, Ramp) else v} does not keep to the ViT's patch "
                    f"{patch}: sizes (and a ramp's ends and multiple_of) must be multiples of {patch}"
                )


def _apply_lr_scale(ctx: KnobContext, value: str) -> None:
    """The lr factor of this step's images against batch_size: linear or square root (global rows, so the
    factor is the same on every rank)."""
    knobs = ctx.knobs
    schedule = getattr(ctx.data, "schedule", None)
    if knobs.get("short_cycle", "none") != "none" and schedule is not None:
        knobs = schedule.at(ctx.tokens)  # the long cycle's shape sets the lr, the short cycle's does not (SlowFast)
    if value == "none" or not knobs.get("batch_size") or not knobs.get("image_size") or ctx.cfg is None:
        ctx.lr_factors.pop("lr_scale", None)
        return
    rows = ImageShape().rows(knobs, longest_image(ctx.cfg.schedule))
    ratio = rows / int(knobs["batch_size"])
    ctx.lr_factors["lr_scale"] = ratio if value == "linear" else math.sqrt(ratio)


register_knob(
    Knob(
        "image_size",
        "Pixels per side of each training image (0: not an image run); a ramp rounds down to multiple_of "
        "(default 4, Composer's size_increment; a ViT's patch for a ViT).",
        default=0,
        integer=True,
        minimum=0,
        multiple_of=4,
        check_config=_check_images,
        graph_key=lambda v: v,  # a new image size is a new input shape
    )
)
register_knob(
    Knob(
        "batch_size",
        "Images per optimizer step at the run's largest image_size (batch_scale: multigrid scales it up at "
        "smaller sizes; 0: not an image run).",
        default=0,
        integer=True,
        minimum=0,
    )
)
register_knob(
    Knob(
        "batch_scale",
        "How a smaller image_size shapes a step: constant (the same images per step) or multigrid (batch x "
        "H x W constant: (largest / image_size)^2 x batch_size images, rounded down).",
        default="constant",
        rampable=False,
        check=_check_choice("batch_scale", ("constant", "multigrid")),
    )
)
register_knob(
    Knob(
        "lr_scale",
        "The learning rate scaled with the step's images against batch_size: none, linear (multigrid's "
        "rule, Goyal et al.) or sqrt.",
        default="none",
        rampable=False,
        check=_check_choice("lr_scale", ("none", "linear", "sqrt")),
        apply=_apply_lr_scale,
        key=lambda v, knobs, length: (
            v,
            knobs.get("image_size"),
            knobs.get("batch_size"),
            knobs.get("batch_scale"),
            knobs.get("short_cycle"),
        ),
    )
)
register_knob(
    Knob(
        "short_cycle",
        "Multigrid's short cycle: none, or multigrid (consecutive steps at image_size x 1/2, 1/sqrt(2), 1, "
        "each rounded down to the size's multiple; with batch_scale: multigrid, 4x, 2x, 1x the images). "
        "lr_scale follows the long cycle only.",
        default="none",
        rampable=False,
        check=_check_choice("short_cycle", ("none", "multigrid")),
    )
)
register_knob(
    Knob(
        "crop_scale",
        "The smallest area fraction a random resized crop keeps (1: whole images, no crop).",
        default=0.35,
        minimum=0.01,
        maximum=1.0,
        model_free=True,
    )
)
