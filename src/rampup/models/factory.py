"""Image classifiers rampup did not write, through the model seam: a constructor named by its import path
(``images.model.arch: factory``, ``images.model.factory: torchvision.models:get_model``) and its keyword
arguments. The constructed model's final classifier layer (``images.model.head``: ``fc`` for torchvision's
ResNets, ``classifier`` for its MobileNets and EfficientNets) becomes the adapter's head, the rest its
features; its top-level parts holding parameters are the blocks that freezing and lr groups act on.
Nothing downloads: pretrained weights are refused (a run's own checkpoint, ``train.init_from``, brings
trained weights). See docs/vision.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn

from rampup.errors import ConfigError

DOWNLOADS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")
"""Keyword arguments that would fetch weights from the internet when set (torchvision's, timm's)."""


def import_factory(path: str) -> Callable[..., nn.Module]:
    """``package.module:callable``, imported; a failure names the path, the cause and the fix."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"images.model.factory '{path}' is not 'package.module:callable' (e.g. torchvision.models:get_model)"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a broken install raises anything: RuntimeError for torchvision's missing ops
        raise ConfigError(
            f"images.model.factory '{path}': {module_name} cannot be imported ({type(e).__name__}: {e}); install the "
            f"build of it made for this torch {torch.__version__} (torchvision: the release paired with it, from the "
            "same package index as torch)"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"images.model.factory '{path}': {module_name} has no callable {attr}")
    return cast(Callable[..., nn.Module], fn)


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


class FactoryClassifier(nn.Module):
    """A constructed classifier split at its final layer: ``features(x)`` runs it with the head replaced by
    the identity (its pooled, flattened features), ``head`` is that layer. Single-channel images are
    repeated to the channels its first convolution takes."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        layer = getattr(model, head, None)
        last = layer[-1] if isinstance(layer, nn.Sequential) and len(layer) else layer
        if not isinstance(last, nn.Linear):
            raise ConfigError(
                f"images.model.head '{head}': {type(model).__name__} has no linear classifier there (found "
                f"{type(layer).__name__}); name the attribute holding its last Linear layer (torchvision: fc or "
                "classifier)"
            )
        self.head = cast(nn.Module, layer)
        setattr(model, head, nn.Identity())
        self.body = model
        conv = _first_conv(model)
        self.in_channels = conv.in_channels if conv is not None else None
        parts = [m for m in model.children() if next(m.parameters(), None) is not None]
        object.__setattr__(self, "blocks", nn.ModuleList(parts))  # a view for freezing: not registered twice

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            if x.shape[1] != 1:
                raise ConfigError(f"the model takes {self.in_channels}-channel images, the data has {x.shape[1]}")
            x = x.expand(-1, self.in_channels, -1, -1)
        out = cast(torch.Tensor, self.body(x))
        if out.dim() != 2:
            raise ConfigError(
                f"{type(self.body).__name__} without its head gives {tuple(out.shape)}, not (batch, features): "
                "images.model.head must name the layer after its pooling and flattening"
            )
        return out

    forward_hidden = features  # the engine's name for a model's training forward (DDP)


def build_factory(path: str, kwargs: dict[str, Any], classes: int, classes_kwarg: str, head: str) -> nn.Module:
    """The classifier ``path(**kwargs, classes_kwarg=classes)`` split at ``head``."""
    fetching = [k for k in DOWNLOADS if kwargs.get(k) not in (None, False)]
    if fetching:
        raise ConfigError(
            f"images.model.kwargs.{fetching[0]} = {kwargs[fetching[0]]!r} would download weights: nothing downloads at "
            "run time; set it to null (train from scratch) or start from a checkpoint with train.init_from"
        )
    model = import_factory(path)(**{**kwargs, classes_kwarg: classes})
    return FactoryClassifier(model, head)
