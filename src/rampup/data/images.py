"""Labelled images for shape curricula: sources, a one-time prepare into memory-mapped uint8 arrays, and a
resumable sampler whose augmentation (random resized crop, horizontal flip) is seeded per image.

Sources: a folder with one subfolder of images per class (PNG, JPEG, ... through Pillow), ``elpv`` (the
``elpv-dataset`` package: 2,624 electroluminescence images of solar cells, 300x300, labelled by the
probability of a defect, 0, 1/3, 2/3 or 1, read as four classes) and ``fashion-mnist`` (Debian's
``dataset-fashion-mnist``: 70,000 28x28 images in 10 classes, its own 60,000 / 10,000 split). Nothing
is downloaded.

``prepare_images`` decodes every image once, centre-crops it square, resizes it to ``resolution`` and
writes ``<cache>/<name>-<key>/{train,val}_images.npy`` (N, H, W, C uint8) with the labels and
``meta.json`` (written last). The validation split is chosen by a hash of each image's name, so it never
changes. :class:`ImageSampler` serves a step of ``batch_size`` images at the step's ``image_size``:
each image's crop and flip come from ``np.random.default_rng([seed, epoch, position])``, so its state
is three integers. See docs/vision.md.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rampup.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
ELPV_CLASSES = ("p0", "p1/3", "p2/3", "p1")
IMAGES_VERSION = 1
_VAL_BUCKETS = 10_000


@dataclass
class Item:
    """One labelled image: a file, or a row of an array (fashion-mnist's idx files); ``split`` when the
    source fixes it."""

    key: str
    label: int
    path: Path | None = None
    array: np.ndarray | None = None
    split: str | None = None


@dataclass
class ImageSource:
    name: str
    classes: list[str]
    items: list[Item]
    files: list[Path] = field(default_factory=list)
    """What the prepared folder is keyed by (their sizes and times)."""


# ----------------------------------------------------------------------------- sources
def resolve_images(source: str) -> ImageSource:
    """The labelled images of ``source``: ``elpv``, ``fashion-mnist`` or a folder of class folders."""
    if source == "elpv":
        return _elpv()
    if source == "fashion-mnist":
        return _fashion_mnist()
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(
            f"image source {source!r} is neither elpv, fashion-mnist nor a folder; give a folder with one "
            "subfolder of images per class"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class subfolders; put each class's images in a folder of its own")
    items, files = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_SUFFIXES)}); add some or remove the folder"
            )
        for p in found:
            items.append(Item(str(p.relative_to(root)), label, path=p))
        files += found
    return ImageSource(re.sub(r"[^A-Za-z0-9_.-]+", "_", root.resolve().name)[:40] or "images", classes, items, files)


def _elpv() -> ImageSource:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("image source 'elpv' needs the elpv-dataset package: pip install elpv-dataset")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    labels = data / "labels.csv"
    items = []
    for line in labels.read_text().splitlines():
        if not line.strip():
            continue
        rel, prob, _kind = line.split()
        items.append(Item(rel, int(round(float(prob) * 3)), path=data / rel))
    return ImageSource("elpv", list(ELPV_CLASSES), items, [labels])


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: a magic number, dimensions, then unsigned bytes), gzip'd."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist() -> ImageSource:
    names = {
        s: (FASHION_MNIST / f"{p}-images-idx3-ubyte.gz", FASHION_MNIST / f"{p}-labels-idx1-ubyte.gz")
        for s, p in (("train", "train"), ("val", "t10k"))
    }
    missing = [str(p) for pair in names.values() for p in pair if not p.is_file()]
    if missing:
        raise DataError(
            f"image source 'fashion-mnist' needs Debian's dataset-fashion-mnist package ({missing[0]} is missing): "
            "apt install dataset-fashion-mnist"
        )
    items = []
    for split, (img, lab) in names.items():
        images, labels = _idx(img), _idx(lab)
        items += [Item(f"{split}/{i}", int(labels[i]), array=images[i], split=split) for i in range(len(labels))]
    return ImageSource("fashion-mnist", list(FASHION_CLASSES), items, [p for pair in names.values() for p in pair])


# ----------------------------------------------------------------------------- prepare
@dataclass
class ImagePrepare:
    """How a source is prepared (the keys of the data section an image run uses)."""

    source: str
    resolution: int = 64
    val_fraction: float = 0.1
    cache_dir: str = ".rampup_cache"
    on_unreadable: Literal["skip", "error"] = "skip"
    channels: Literal["auto", 1, 3] = "auto"


def _key(cfg: ImagePrepare, src: ImageSource) -> str:
    listing = hashlib.blake2b(digest_size=16)
    for f in src.files:
        st = f.stat()
        listing.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    settings = {
        "version": IMAGES_VERSION,
        "source": cfg.source if cfg.source in ("elpv", "fashion-mnist") else str(Path(cfg.source).resolve()),
        "files": listing.hexdigest(),
        "resolution": cfg.resolution,
        "val_fraction": cfg.val_fraction,
        "on_unreadable": cfg.on_unreadable,
        "channels": cfg.channels,
    }
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()


def images_dir(cfg: ImagePrepare) -> Path:
    src = resolve_images(cfg.source)
    return Path(cfg.cache_dir).expanduser() / f"{src.name}-{cfg.resolution}-{_key(cfg, src)}"


def _load(item: Item, channels: int, resolution: int) -> np.ndarray:
    """(resolution, resolution, channels) uint8: decoded in full, centre-cropped square, resized (bicubic)."""
    if item.array is not None:
        img = Image.fromarray(item.array)
    else:
        assert item.path is not None
        img = Image.open(item.path)
        img.load()  # decode now: a truncated file fails here, named by the caller
    if img.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit or float grey: scaled to 8 bits
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        img = Image.fromarray(((a - lo) / (hi - lo or 1.0) * 255).round().astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).reshape(resolution, resolution, channels)


def _channels(src: ImageSource, wanted: Any) -> int:
    if wanted in (1, 3):
        return int(wanted)
    grey = ("1", "L", "LA", "I;16", "I;16B", "I", "F", "P")
    for item in src.items[:200]:  # headers only
        if item.array is not None:
            return 1 if item.array.ndim == 2 else 3
        try:
            with Image.open(item.path) as img:  # type: ignore[arg-type]
                if img.mode not in grey:
                    return 3
        except OSError:
            continue
    return 1


def prepare_images(cfg: ImagePrepare) -> Path:
    """The prepared folder of ``cfg``: decoded and cached once, reused after."""
    if not 8 <= cfg.resolution <= 1024:
        raise ConfigError(f"data.resolution {cfg.resolution}: images are cached at 8..1024 pixels")
    src = resolve_images(cfg.source)
    final = Path(cfg.cache_dir).expanduser() / f"{src.name}-{cfg.resolution}-{_key(cfg, src)}"
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(cfg, src, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _split_of(item: Item, val_fraction: float) -> str:
    if item.split is not None:
        return item.split
    h = int.from_bytes(hashlib.blake2b(item.key.encode(), digest_size=8).digest(), "little") % _VAL_BUCKETS
    return "val" if h < round(val_fraction * _VAL_BUCKETS) else "train"


def _write(cfg: ImagePrepare, src: ImageSource, out: Path) -> None:
    channels = _channels(src, cfg.channels)
    R = cfg.resolution
    splits = {s: [it for it in src.items if _split_of(it, cfg.val_fraction) == s] for s in ("train", "val")}
    skipped: list[str] = []
    meta: dict[str, Any] = {"version": IMAGES_VERSION, "source": cfg.source, "classes": src.classes}
    for split, items in splits.items():
        arr = np.lib.format.open_memmap(
            out / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(len(items), R, R, channels)
        )
        labels = []
        n = 0
        for item in items:
            try:
                arr[n] = _load(item, channels, R)
            except (OSError, ValueError, SyntaxError) as e:  # Pillow: unreadable or truncated
                if cfg.on_unreadable == "error":
                    raise DataError(
                        f"image {item.path or item.key} is unreadable or truncated ({e}); fix or remove it, or "
                        "set data.on_unreadable: skip"
                    ) from None
                skipped.append(str(item.path or item.key))
                continue
            labels.append(item.label)
            n += 1
        arr.flush()
        del arr
        if n < len(items):  # skipped images: rewrite at the kept count
            kept = np.load(out / f"{split}_images.npy", mmap_mode="r", allow_pickle=False)[:n].copy()
            np.save(out / f"{split}_images.npy", kept)
        np.save(out / f"{split}_labels.npy", np.array(labels, dtype=np.int64))
        meta[split] = {
            "n": n,
            "per_class": np.bincount(np.array(labels, dtype=np.int64), minlength=len(src.classes)).tolist(),
        }
    if meta["train"]["n"] == 0 or meta["val"]["n"] == 0:
        raise DataError(
            f"image source {cfg.source}: {meta['train']['n']} training and {meta['val']['n']} validation images "
            "after the split; add images or change data.val_fraction"
        )
    train = np.load(out / "train_images.npy", mmap_mode="r", allow_pickle=False)
    sums = np.zeros(channels)
    sq = np.zeros(channels)
    for start in range(0, len(train), 1024):
        chunk = np.asarray(train[start : start + 1024], dtype=np.float64) / 255.0
        sums += chunk.sum(axis=(0, 1, 2))
        sq += (chunk**2).sum(axis=(0, 1, 2))
    count = len(train) * R * R
    mean = sums / count
    meta |= {
        "channels": channels,
        "resolution": R,
        "mean": mean.tolist(),
        "std": np.sqrt(np.maximum(sq / count - mean**2, 1e-12)).tolist(),
        "skipped": skipped[:20],
        "n_skipped": len(skipped),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


# ----------------------------------------------------------------------------- the dataset and the sampler
class ImageDataset:
    """One split of a prepared image folder, memory-mapped."""

    def __init__(self, folder: Path, split: str) -> None:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no prepared images in {folder} (meta.json is missing); prepare them first")
        self.folder, self.split = folder, split
        self.meta = json.loads(meta_path.read_text())
        self.images = np.load(folder / f"{split}_images.npy", mmap_mode="r", allow_pickle=False)  # (N, H, W, C) uint8
        self.labels = np.load(folder / f"{split}_labels.npy", allow_pickle=False)
        if len(self.images) != len(self.labels) or len(self.labels) != self.meta[split]["n"]:
            raise DataError(f"{folder}: the {split} images and labels disagree with meta.json; delete the folder")
        self.classes: list[str] = self.meta["classes"]
        self.mean = torch.tensor(self.meta["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(self.meta["std"], dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def identity(self) -> str:
        h = hashlib.blake2b(digest_size=12)
        h.update(json.dumps(self.meta, sort_keys=True).encode())
        return h.hexdigest()

    def tensor(self, i: int) -> torch.Tensor:
        """(C, H, W) uint8 of image ``i``."""
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # a copy: the map is read-only

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 255] floats -> standardised by the training split's per-channel mean and std."""
        return (x.float() / 255.0 - self.mean) / self.std


def crop_box(rng: np.random.Generator, height: int, width: int, min_scale: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: an area fraction in [min_scale, 1] and an aspect ratio
    in [3/4, 4/3] (log-uniform), tried 10 times; else the whole image (Szegedy et al.'s Inception crop)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w = int(round((target * aspect) ** 0.5))
        h = int(round((target / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) float -> (C, size, size), bilinear with antialiasing (Composer's mode='resize')."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class ImageSampler:
    """Shuffled images, a new order each epoch, each served once per epoch with its own seeded crop and flip
    at the step's ``image_size`` (knob); ``crop_scale`` (knob) is the smallest area fraction a crop keeps."""

    kind = "images"

    def __init__(self, dataset: ImageDataset, seed: int, *, augment: bool = True) -> None:
        if len(dataset) == 0:
            raise DataError(f"the {dataset.split} split of {dataset.folder} has no images")
        self.dataset, self.seed, self.augment = dataset, seed, augment
        self.epoch, self.pos, self.tokens_served = 0, 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)))
        return self._order[1]

    def image(self, epoch: int, pos: int, size: int, min_scale: float) -> tuple[torch.Tensor, int]:
        i = int(self.order(epoch)[pos])
        x = self.dataset.tensor(i)
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, pos, 0x1A6E])
            top, left, h, w = crop_box(rng, x.shape[1], x.shape[2], min_scale)
            x = x[:, top : top + h, left : left + w]
            if rng.random() < 0.5:
                x = x.flip(-1)
        return resize(self.dataset.normalise(x), size), int(self.dataset.labels[i])

    def next_batch(self, size: int, batch_size: int, min_scale: float = 0.35) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size < 1:
            raise ConfigError(f"a step of {batch_size} images: batch_size must round to at least one image")
        xs, ys = [], []
        for _ in range(batch_size):
            x, y = self.image(self.epoch, self.pos, size, min_scale)
            xs.append(x)
            ys.append(y)
            self.pos += 1
            if self.pos == len(self.dataset):
                self.epoch, self.pos = self.epoch + 1, 0
        self.tokens_served += batch_size
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

    def take(self, sp: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch(int(sp.knobs["image_size"]), sp.batch_size, float(sp.knobs.get("crop_scale", 0.35)))

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "epoch": self.epoch,
            "pos": self.pos,
            "tokens_served": self.tokens_served,
            "n": len(self.dataset),
            "data_id": self.dataset.identity,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ConfigError(f"sampler state is for a '{state.get('kind')}' sampler, not an image sampler")
        if state["n"] != len(self.dataset) or state["data_id"] != self.dataset.identity:
            raise DataError(
                "the images changed since the run started; a resume continues only on the data it started with"
            )
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self.tokens_served = int(state["tokens_served"])


def eval_batches(
    dataset: ImageDataset, size: int, max_items: int, batch: int = 256
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The split's first ``max_items`` images, whole (no crop), resized to ``size``, in batches."""
    n = min(len(dataset), max_items)
    out = []
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        x = torch.stack([resize(dataset.normalise(dataset.tensor(i)), size) for i in idx])
        out.append((x, torch.from_numpy(dataset.labels[start : start + len(idx)].copy())))
    return out
