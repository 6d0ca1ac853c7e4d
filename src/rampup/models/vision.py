"""Image classifiers for shape curricula: a small ResNet and a small ViT, written for rampup, behind the
model seam (:class:`ImageClassifierAdapter`), and the classification task.

Both take any image size a schedule asks for: the ResNet is fully convolutional up to a global average
pool; the ViT holds learned position embeddings on a base grid and interpolates them (bicubic, as
DeiT and timm do) to the grid of the batch's size, so a resolution stage changes nothing in the
weights. A ViT size must be a multiple of its patch. See docs/vision.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from rampup.configbase import Section
from rampup.errors import ConfigError
from rampup.models.factory import build_factory
from rampup.protocols import Batch, ModelOutput

# ----------------------------------------------------------------------------- the ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual; a strided 1x1 projection when the shape changes.
    ``forward(x, inner)`` with ``inner`` < the block's width runs the Once-for-All sub-block: the first
    ``inner`` channels of the first convolution (and of its batch norm), the matching inputs of the second."""

    def __init__(self, c_in: int, c_out: int, stride: int, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or c_out  # fewer: a Once-for-All sub-network exported as a model of its own
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity (Goyal et al.)
        self.proj = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, inner: int | None = None) -> torch.Tensor:
        if inner is None or inner >= self.conv1.out_channels:
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.proj(x))
        c1, bn = self.conv1, self.bn1
        y = F.conv2d(x, c1.weight[:inner], None, c1.stride, c1.padding)
        assert bn.running_mean is not None and bn.running_var is not None
        y = F.batch_norm(
            y,
            bn.running_mean[:inner],
            bn.running_var[:inner],
            bn.weight[:inner],
            bn.bias[:inner],
            self.training,
            0.0,
            bn.eps,
        )  # momentum 0: a sub-network's statistics never enter the full network's running ones
        y = F.conv2d(F.relu(y), self.conv2.weight[:, :inner], None, 1, 1)
        return F.relu(self.bn2(y) + self.proj(x))


def inner_channels(width: int, hidden: int, widest: int) -> int:
    """A block's inner channels in the sub-network drawn with ``hidden`` of the last stage's ``widest``: the
    same fraction of its own ``width``, a multiple of 8 (at least 8, at most ``width``)."""
    return max(8, min(width, round(width * hidden / widest / 8) * 8))


@contextlib.contextmanager
def _frozen_stats(module: nn.Module) -> Iterator[None]:
    """Batch norms normalise by the batch's statistics (in training) without updating their running ones."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, v in zip(norms, saved, strict=True):
            m.momentum = v


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, stages of basic blocks (the first of each later stage strided),
    global average pooling and a linear head. ``widths`` and ``depths`` per stage.

    Once-for-All sub-networks (knob ``subnet``): with ``active_depth`` d each stage runs its first d blocks
    (OFA's elastic depth; a stage's first block always runs, it changes the shape), and with
    ``active_hidden`` k each block keeps the first ``k / widths[-1]`` of its inner channels (OFA's elastic
    width, rounded to a multiple of 8). A sub-network's forward leaves the running statistics alone."""

    def __init__(
        self,
        channels: int,
        classes: int,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        inner: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]))
        blocks: list[nn.Module] = []
        self.position: list[int] = []  # each block's index within its stage
        c = widths[0]
        for s, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for i in range(d):
                blocks.append(BasicBlock(c, w, 2 if s > 0 and i == 0 else 1, inner[s] if inner else None))
                self.position.append(i)
                c = w
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, classes)
        self.widest = c
        self.active_depth: int | None = None
        self.active_hidden: int | None = None

    def subnet_space(self) -> tuple[int, int]:
        """(blocks of the deepest stage, the last stage's width): what a ``subnet`` spec's depth and mlp
        ranges are drawn against."""
        return max(self.position) + 1, self.widest

    def features(self, x: torch.Tensor) -> torch.Tensor:
        depth, hidden = self.active_depth, self.active_hidden
        if depth is None and hidden is None:
            x = F.relu(self.stem(x))
            for b in self.blocks:
                x = b(x)
            return x.mean(dim=(2, 3))  # (B, C)
        with _frozen_stats(self):
            x = F.relu(self.stem(x))
            for b, i in zip(self.blocks, self.position, strict=True):
                if depth is not None and i >= depth:
                    continue
                inner = None
                if hidden is not None:
                    inner = inner_channels(cast(BasicBlock, b).conv1.out_channels, hidden, self.widest)
                x = b(x, inner)
            return x.mean(dim=(2, 3))

    forward_hidden = features  # the engine's name for a model's training forward (DDP, FSDP2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes)."""
        return cast(torch.Tensor, self.head(self.features(x)))


# ----------------------------------------------------------------------------- the ViT


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: multi-head self-attention (SDPA) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer: patch embedding, a class token, learned position embeddings on the
    ``base_size // patch`` grid (interpolated to other grids), encoder blocks, a final norm, a linear head."""

    def __init__(
        self, channels: int, classes: int, *, patch: int, dim: int, depth: int, heads: int, base_size: int
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.dim {dim} must be a multiple of model.heads {heads}")
        check_patch(base_size, patch)
        self.patch, self.base_grid = patch, base_size // patch
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.base_grid**2, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def position_embeddings(self, grid: int) -> torch.Tensor:
        """(1, 1 + grid^2, dim): the class token's and the base grid's embeddings, bicubic to ``grid``."""
        if grid == self.base_grid:
            return self.pos
        cls, patches = self.pos[:, :1], self.pos[:, 1:]
        g = self.base_grid
        patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H != W:
            raise ConfigError(f"the ViT takes square images, got {H}x{W}")
        check_patch(H, self.patch)
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings(H // self.patch)
        for b in self.blocks:
            x = b(x)
        return self.norm(x[:, 0])  # (B, D): the class token

    forward_hidden = features  # the engine's name for a model's training forward (DDP, FSDP2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes)."""
        return cast(torch.Tensor, self.head(self.features(x)))


def check_patch(size: int, patch: int) -> None:
    if size % patch or size < patch:
        lo, hi = max(patch, size // patch * patch), (size // patch + 1) * patch
        raise ConfigError(
            f"image size {size} is not a multiple of the ViT's patch {patch}; use {lo} or {hi} "
            f"(a ramp of image_size rounds to multiple_of: {patch})"
        )


# ----------------------------------------------------------------------------- config, adapter, task


class VisionConfig(Section):
    """An image classifier (``images.model``): ``arch`` resnet or vit and its sizes; the data gives its
    channels and classes, and for a ViT the run's largest image_size is ``base_size``."""

    arch: Literal["resnet", "vit", "factory"] = "resnet"
    """resnet: a small ResNet (widths, depths); vit: a small vision transformer (patch, dim, depth, heads);
    factory: a classifier built by an importable constructor (factory, kwargs, head), e.g. torchvision's."""
    channels: int = Field(default=3, ge=1)
    """Input channels (set from the prepared images)."""
    classes: int = Field(default=10, ge=2)
    """Output classes (set from the prepared images)."""
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128])
    """ResNet: channels per stage."""
    depths: list[int] = Field(default_factory=lambda: [2, 2, 2])
    """ResNet: basic blocks per stage."""
    inner: list[int] | None = None
    """ResNet: inner channels of each stage's blocks (default: the stage's width; an exported Once-for-All
    sub-network has fewer)."""
    patch: int = Field(default=8, ge=1)
    """ViT: patch size in pixels; every image_size must be a multiple of it."""
    dim: int = Field(default=128, ge=8)
    """ViT: embedding width."""
    depth: int = Field(default=6, ge=1)
    """ViT: encoder blocks."""
    heads: int = Field(default=4, ge=1)
    """ViT: attention heads (dim must be a multiple)."""
    base_size: int = Field(default=32, ge=1)
    """ViT: the image size its position embeddings are learned for (an image run sets the largest image_size)."""
    factory: str | None = None
    """factory: the constructor, 'package.module:callable' (e.g. torchvision.models:get_model)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """factory: its keyword arguments (e.g. {name: resnet18, weights: null}); the classes are added."""
    classes_kwarg: str = "num_classes"
    """factory: the keyword that takes the number of classes."""
    head: str = "fc"
    """factory: the attribute holding the model's final classifier (torchvision: fc or classifier)."""

    @model_validator(mode="after")
    def _shape(self) -> VisionConfig:
        if self.arch == "resnet" and (len(self.widths) != len(self.depths) or not self.widths):
            raise ValueError(f"images.model: widths {self.widths} and depths {self.depths} need one entry per stage")
        if self.arch == "resnet" and self.inner is not None and len(self.inner) != len(self.widths):
            raise ValueError(f"images.model: inner {self.inner} needs one entry per stage, as widths {self.widths}")
        if self.arch == "factory" and not self.factory:
            raise ValueError("images.model.arch factory needs images.model.factory (e.g. torchvision.models:get_model)")
        if self.arch == "vit" and self.dim % self.heads:
            raise ValueError(f"images.model: dim {self.dim} must be a multiple of heads {self.heads}")
        return self

    def build(self) -> nn.Module:
        if self.arch == "resnet":
            inner = tuple(self.inner) if self.inner else None
            return ResNet(self.channels, self.classes, tuple(self.widths), tuple(self.depths), inner)
        if self.arch == "factory":
            assert self.factory is not None  # checked by the validator
            return build_factory(self.factory, self.kwargs, self.classes, self.classes_kwarg, self.head)
        return ViT(
            self.channels,
            self.classes,
            patch=self.patch,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            base_size=self.base_size,
        )


@torch.no_grad()
def extract_subnetwork(cfg: VisionConfig, module: nn.Module, depth: int, hidden: int) -> tuple[VisionConfig, ResNet]:
    """The ResNet sub-network of ``depth`` blocks per stage and ``hidden`` of the last stage's width (as the
    knob ``subnet`` draws them) as a model of its own: its config and a ResNet holding the sliced weights.
    Its outputs equal the sub-network's inside ``module`` in eval mode."""
    if cfg.arch != "resnet" or not isinstance(module, ResNet):
        raise ConfigError(f"sub-networks are built for the ResNet, not a {cfg.arch}")
    if not 1 <= depth <= max(cfg.depths) or not 0 < hidden <= module.widest:
        raise ConfigError(
            f"sub-network depth {depth} / {hidden} of {module.widest} channels is not inside this ResNet "
            f"(at most {max(cfg.depths)} blocks per stage)"
        )
    inner = [inner_channels(w, hidden, module.widest) for w in cfg.widths]
    small_cfg = cfg.model_copy(update={"depths": [min(depth, d) for d in cfg.depths], "inner": inner})
    small = cast(ResNet, small_cfg.build())
    state: dict[str, torch.Tensor] = {}
    kept = [i for i, pos in enumerate(module.position) if pos < depth]
    stage_of = [s for s, d in enumerate(cfg.depths) for _ in range(d)]
    for k, v in module.state_dict().items():
        if not k.startswith("blocks."):
            state[k] = v.clone()
            continue
        _, i, rest = k.split(".", 2)
        if int(i) not in kept:
            continue
        k_in = inner[stage_of[int(i)]]
        if rest.startswith("conv1.") or (rest.startswith("bn1.") and v.dim() == 1):
            v = v[:k_in]
        elif rest.startswith("conv2."):
            v = v[:, :k_in]
        state[f"blocks.{kept.index(int(i))}.{rest}"] = v.clone()
    small.load_state_dict(state)
    return small_cfg, small


class ImageClassifierAdapter:
    """A ResNet, ViT or any module with ``features(x) -> (B, D)`` and a ``head`` behind the model seam."""

    KNOBS = frozenset(
        {
            "image_size",
            "batch_size",
            "batch_scale",
            "lr_scale",
            "crop_scale",
            "short_cycle",
            "lr_mult",
            "freeze",
            "lr_groups",
            "lr_layer_decay",
            "optimizer_state",
            "teacher",
            "distill_weight",
            "label_weight",
            "distill_temperature",
        }
    )
    """What an image classifier honours; sequence knobs (rope, seq_len, window ...) are refused by name
    (``subnet`` too, unless the module has sub-networks: the ResNet)."""

    def __init__(self, module: nn.Module, fresh: Callable[[], nn.Module] | None = None) -> None:
        self.module = module
        self.head = cast(nn.Module, module.head)
        self._hidden: Callable[[torch.Tensor], torch.Tensor] = self._plain()
        """The training forward: a compiled one after compile(), the DDP wrapper's under DDP (the engine's
        rampup.engine.distributed replaces it, as for a language model's adapter)."""
        self._flops: dict[tuple[int, ...], float] = {}
        self._fresh = fresh

    def fresh(self) -> ImageClassifierAdapter:
        """A new classifier of the same architecture (on the CPU, its own initial weights): what a snapshot or
        EMA teacher of this model is loaded into."""
        if self._fresh is None:
            raise ConfigError("this classifier was built without a recipe for a copy; pass fresh= to the adapter")
        return ImageClassifierAdapter(self._fresh(), self._fresh)

    def _plain(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The module's own features: ``forward_hidden`` where it has one (FSDP2 registers it as a forward
        method), else ``features``."""
        return cast(
            Callable[[torch.Tensor], torch.Tensor], getattr(self.module, "forward_hidden", self.module.features)
        )

    def forward(self, batch: Batch) -> ModelOutput:
        """Hidden states (B, 1, D): each image is a sequence of one item, so sequence losses (distillation,
        sub-networks, tiled heads) apply to classifiers unchanged; targets are (B, 1) to match. Training
        goes through the compiled or DDP-wrapped forward, evaluation through the plain one."""
        hidden = self._hidden if self.module.training else self._plain()
        return ModelOutput(hidden(batch.inputs).unsqueeze(1), self.head)

    def subnet_space(self) -> tuple[int, int]:
        space = getattr(self.module, "subnet_space", None)
        if space is None:
            raise ConfigError(f"{type(self.module).__name__} has no sub-networks (knob subnet): use the ResNet")
        return cast(tuple[int, int], space())

    def hidden_states(self, batch: Batch, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        wanted = set(layers)
        out: dict[int, torch.Tensor] = {}
        hooks = [
            b.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o))
            for n, (_, b) in enumerate(self.blocks())
            if n in wanted
        ]
        try:
            self._plain()(batch.inputs)
        finally:
            for h in hooks:
                h.remove()
        return out

    def blocks(self) -> list[tuple[str, nn.Module]]:
        blocks = self.module.blocks
        assert isinstance(blocks, nn.ModuleList)
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]

    def wrap_block(self, index: int, fn: Callable[[nn.Module], nn.Module]) -> None:
        blocks = self.module.blocks
        assert isinstance(blocks, nn.ModuleList)
        blocks[index] = fn(blocks[index])

    def flops_per_item(self, shape: tuple[int, ...], **how: Any) -> float:
        """Training FLOPs of one image of ``shape`` (C, H, W) or (B, C, H, W): 3x the forward's, counted by
        torch's FLOP counter on meta tensors at that size (the live weights are not touched; cached per size)."""
        chw = tuple(shape[-3:])
        if chw not in self._flops:
            logits = _Logits(self.module)
            meta = {f"m.{k}": torch.empty_like(v, device="meta") for k, v in self.module.state_dict().items()}
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                functional_call(logits, meta, (torch.empty(1, *chw, device="meta"),))
            self._flops[chw] = 3.0 * counter.get_total_flops()
        return self._flops[chw]

    def supports(self, knob: str) -> bool:
        return knob in self.KNOBS or (knob == "subnet" and hasattr(self.module, "subnet_space"))

    def compile(self, **kwargs: Any) -> None:
        self._hidden = torch.compile(self._plain(), **kwargs)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        raise ConfigError("an image classifier has no Hugging Face export; its checkpoint is a safetensors state dict")

    def from_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class _Logits(nn.Module):
    """features then head, as one module for a functional call."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(nn.Module, self.m.head)(cast(Callable[[torch.Tensor], torch.Tensor], self.m.features)(x))


class ImageClassification:
    """Cross-entropy over classes; a batch is (B, C, H, W) float images and (B, 1) labels (one target per
    image, as the adapter's hidden states are one item per image). Its step shape:
    rampup.schedule.shapes.ImageShape (progress counts images)."""

    def make_batch(self, x: torch.Tensor, y: torch.Tensor, *, training: bool = True) -> Batch:
        return Batch(x, y.reshape(-1, 1), {})

    def logits(self, adapter: Any, batch: Batch) -> torch.Tensor:
        """(B, classes)."""
        out = adapter.forward(batch)
        return cast(torch.Tensor, out.head(out.hidden)).flatten(0, 1)

    def loss(self, adapter: Any, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.logits(adapter, batch).float(), batch.targets.flatten(), reduction=reduction)

    def doc_lengths(self, batch: Batch) -> list[list[int]] | None:
        return None

    def score(self, adapter: Any, batch: Batch) -> tuple[float, int]:
        """(summed loss, correct predictions) of a batch from one forward pass (evaluation's accuracy)."""
        logits = self.logits(adapter, batch).float()
        targets = batch.targets.flatten()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        return float(loss), int((logits.argmax(-1) == targets).sum())

    def correct(self, adapter: Any, batch: Batch) -> int:
        """Items whose argmax class is the label (accuracy = correct / items)."""
        return int((self.logits(adapter, batch).argmax(-1) == batch.targets.flatten()).sum())
