"""Image classifiers for shape curricula: a small ResNet and a small ViT, written for rampup, behind the
model seam (:class:`ImageClassifierAdapter`), and the classification task.

Both take any image size a schedule asks for: the ResNet is fully convolutional up to a global average
pool; the ViT holds learned position embeddings on a base grid and interpolates them (bicubic, as
DeiT and timm do) to the grid of the batch's size, so a resolution stage changes nothing in the
weights. A ViT size must be a multiple of its patch. See docs/vision.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from rampup.configbase import Section
from rampup.errors import ConfigError
from rampup.protocols import Batch, ModelOutput

# ----------------------------------------------------------------------------- the ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual; a strided 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity (Goyal et al.)
        self.proj = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.proj(x))


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, stages of basic blocks (the first of each later stage strided),
    global average pooling and a linear head. ``widths`` and ``depths`` per stage."""

    def __init__(self, channels: int, classes: int, widths: tuple[int, ...], depths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]))
        blocks: list[nn.Module] = []
        c = widths[0]
        for s, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for i in range(d):
                blocks.append(BasicBlock(c, w, 2 if s > 0 and i == 0 else 1))
                c = w
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return x.mean(dim=(2, 3))  # (B, C)


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

    arch: Literal["resnet", "vit"] = "resnet"
    """resnet: a small ResNet (widths, depths); vit: a small vision transformer (patch, dim, depth, heads)."""
    channels: int = Field(default=3, ge=1)
    """Input channels (set from the prepared images)."""
    classes: int = Field(default=10, ge=2)
    """Output classes (set from the prepared images)."""
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128])
    """ResNet: channels per stage."""
    depths: list[int] = Field(default_factory=lambda: [2, 2, 2])
    """ResNet: basic blocks per stage."""
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

    @model_validator(mode="after")
    def _shape(self) -> VisionConfig:
        if self.arch == "resnet" and (len(self.widths) != len(self.depths) or not self.widths):
            raise ValueError(f"images.model: widths {self.widths} and depths {self.depths} need one entry per stage")
        if self.arch == "vit" and self.dim % self.heads:
            raise ValueError(f"images.model: dim {self.dim} must be a multiple of heads {self.heads}")
        return self

    def build(self) -> nn.Module:
        if self.arch == "resnet":
            return ResNet(self.channels, self.classes, tuple(self.widths), tuple(self.depths))
        return ViT(
            self.channels,
            self.classes,
            patch=self.patch,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            base_size=self.base_size,
        )


class ImageClassifierAdapter:
    """A ResNet, ViT or any module with ``features(x) -> (B, D)`` and a ``head`` behind the model seam."""

    KNOBS = frozenset(
        {
            "image_size",
            "batch_size",
            "batch_scale",
            "lr_scale",
            "crop_scale",
            "lr_mult",
            "freeze",
            "lr_groups",
            "lr_layer_decay",
            "optimizer_state",
        }
    )
    """What an image classifier honours; sequence knobs (rope, seq_len, window ...) are refused by name."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.head = cast(nn.Module, module.head)
        self._features = cast(Callable[[torch.Tensor], torch.Tensor], module.features)
        self._flops: dict[tuple[int, ...], float] = {}

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(self._features(batch.inputs), self.head)

    def hidden_states(self, batch: Batch, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        wanted = set(layers)
        out: dict[int, torch.Tensor] = {}
        hooks = [
            b.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o))
            for n, (_, b) in enumerate(self.blocks())
            if n in wanted
        ]
        try:
            self._features(batch.inputs)
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
        return knob in self.KNOBS

    def compile(self, **kwargs: Any) -> None:
        self._features = torch.compile(cast(Callable[[torch.Tensor], torch.Tensor], self.module.features), **kwargs)

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
    """Cross-entropy over classes; a batch is (B, C, H, W) float images and (B,) labels. Its step shape:
    rampup.schedule.shapes.ImageShape (progress counts images)."""

    def make_batch(self, x: torch.Tensor, y: torch.Tensor, *, training: bool = True) -> Batch:
        return Batch(x, y, {})

    def logits(self, adapter: Any, batch: Batch) -> torch.Tensor:
        out = adapter.forward(batch)
        return out.head(out.hidden)

    def loss(self, adapter: Any, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.logits(adapter, batch).float(), batch.targets, reduction=reduction)

    def doc_lengths(self, batch: Batch) -> list[list[int]] | None:
        return None

    def score(self, adapter: Any, batch: Batch) -> tuple[float, int]:
        """(summed loss, correct predictions) of a batch from one forward pass (evaluation's accuracy)."""
        logits = self.logits(adapter, batch).float()
        loss = F.cross_entropy(logits, batch.targets, reduction="sum")
        return float(loss), int((logits.argmax(-1) == batch.targets).sum())

    def correct(self, adapter: Any, batch: Batch) -> int:
        """Items whose argmax class is the label (accuracy = correct / items)."""
        return int((self.logits(adapter, batch).argmax(-1) == batch.targets).sum())
