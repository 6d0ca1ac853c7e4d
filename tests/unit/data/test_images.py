"""Images for shape curricula (rampup.data.images, rampup.models.vision): generated PNG folders (real files
through Pillow), the prepare cache, the seeded augmentation and its state, the two models at several sizes,
and the errors of bad input. The two real datasets are used where installed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import png_folder
from rampup.data.images import (
    ImageDataset,
    ImagePrepare,
    ImageSampler,
    crop_box,
    eval_batches,
    prepare_images,
    resolve_images,
)
from rampup.errors import ConfigError, DataError
from rampup.models.vision import ImageClassification, ImageClassifierAdapter, ResNet, VisionConfig, ViT
from rampup.protocols import Batch, ModelAdapter


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return png_folder(tmp_path_factory.mktemp("pngs"))


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    return prepare_images(
        ImagePrepare(str(folder), resolution=32, val_fraction=0.25, cache_dir=str(tmp_path_factory.mktemp("c")))
    )


def test_prepare_decodes_once_into_uint8_arrays_with_a_fixed_split(folder, prepared, tmp_path):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["classes"] == ["class_0", "class_1", "class_2"] and meta["channels"] == 3
    assert meta["train"]["n"] + meta["val"]["n"] == 36 and meta["val"]["n"] > 0
    train = ImageDataset(prepared, "train")
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (32, 32, 3)
    assert isinstance(train.images, np.memmap)
    # the same settings reuse the folder; the split is a hash of each name, the same in another cache
    again = prepare_images(ImagePrepare(str(folder), resolution=32, val_fraction=0.25, cache_dir=str(tmp_path)))
    assert np.array_equal(np.load(again / "val_labels.npy"), np.load(prepared / "val_labels.npy"))
    assert np.array_equal(np.load(again / "val_images.npy"), np.load(prepared / "val_images.npy"))


def test_the_sampler_is_seeded_per_image_and_resumes_from_three_integers(prepared):
    ds = ImageDataset(prepared, "train")
    a = ImageSampler(ds, seed=3)
    first = [a.next_batch(24, 5) for _ in range(3)]
    assert first[0][0].shape == (5, 3, 24, 24) and first[0][0].dtype == torch.float32
    state = json.loads(json.dumps(a.state_dict()))
    rest_a = [a.next_batch(size, 4) for size in (16, 32, 24, 32, 16, 32, 32, 32)]  # sizes change: a resizing run
    b = ImageSampler(ds, seed=3)
    b.load_state_dict(state)
    rest_b = [b.next_batch(size, 4) for size in (16, 32, 24, 32, 16, 32, 32, 32)]
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(rest_a, rest_b, strict=True))
    assert a.epoch >= 1  # crossed an epoch: each image once per epoch
    c = ImageSampler(ds, seed=4)
    assert not torch.equal(c.next_batch(24, 5)[0], first[0][0])
    served = []
    d = ImageSampler(ds, seed=5)
    for _ in range(len(ds)):
        d.next_batch(16, 1)
        served.append(int(d.order(0)[d.pos - 1]) if d.pos else None)
    assert d.epoch == 1 and sorted(int(i) for i in d.order(0)) == list(range(len(ds)))


def test_crops_keep_the_area_asked_for():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_box(rng, 32, 40, 0.35)
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 40
        assert h * w >= 0.3 * 32 * 40 or (h, w) == (32, 40)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_both_models_take_every_size_of_a_resizing_run_and_learn(prepared, arch):
    torch.manual_seed(0)
    cfg = VisionConfig(
        arch=arch,
        channels=3,
        classes=3,
        widths=(16, 32),
        depths=(1, 1),
        dim=48,
        depth=2,
        heads=4,
        patch=8,
        base_size=32,
    )
    adapter = ImageClassifierAdapter(cfg.build())
    assert isinstance(adapter, ModelAdapter)
    task = ImageClassification()
    sampler = ImageSampler(ImageDataset(prepared, "train"), seed=0)
    opt = torch.optim.AdamW(adapter.module.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        size = (16, 24, 32)[min(2, step // 20)]
        x, y = sampler.next_batch(size, 8)
        loss = task.loss(adapter, task.make_batch(x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    val = eval_batches(ImageDataset(prepared, "val"), 32, 100)
    adapter.module.eval()
    with torch.no_grad():
        correct = sum(task.correct(adapter, Batch(x, y, {})) for x, y in val)
    assert correct / sum(len(y) for _, y in val) > 1 / 3  # above chance
    # FLOPs grow with the area: the ResNet's 4x; the ViT's with its tokens, 1 + 16 patches against 1 + 4
    f16, f32 = adapter.flops_per_item((3, 16, 16)), adapter.flops_per_item((3, 32, 32))
    assert f32 / f16 == pytest.approx(4.0, rel=0.05) if arch == "resnet" else 17 / 5 <= f32 / f16 < 4.5


def test_vit_position_embeddings_interpolate_and_a_size_off_the_patch_is_named():
    vit = ViT(3, 4, patch=8, dim=32, depth=1, heads=4, base_size=32)
    assert vit.position_embeddings(4).shape == (1, 17, 32)
    assert torch.equal(vit.position_embeddings(4), vit.pos)
    assert vit.position_embeddings(6).shape == (1, 37, 32)
    assert vit.features(torch.zeros(2, 3, 48, 48)).shape == (2, 32)
    with pytest.raises(ConfigError, match="image size 36 is not a multiple of the ViT's patch 8; use 32 or 40"):
        vit.features(torch.zeros(1, 3, 36, 36))


def test_a_resnet_is_the_same_at_any_size_after_pooling():
    net = ResNet(1, 2, (8, 16), (1, 1))
    for s in (12, 28, 33):
        assert net.features(torch.zeros(2, 1, s, s)).shape == (2, 16)


def test_bad_image_folders_are_named(tmp_path):
    root = png_folder(tmp_path / "imgs", classes=2, per_class=4)
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="class folder .*empty_class has no images"):
        resolve_images(str(root))
    (root / "empty_class").rmdir()
    bad = root / "class_1" / "broken.png"
    good = (root / "class_1" / "img000.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    skip = prepare_images(ImagePrepare(str(root), resolution=16, val_fraction=0.25, cache_dir=str(tmp_path / "c")))
    meta = json.loads((skip / "meta.json").read_text())
    assert meta["n_skipped"] == 1 and meta["skipped"][0].endswith("broken.png")
    assert meta["train"]["n"] + meta["val"]["n"] == 8
    with pytest.raises(DataError, match="broken.png is unreadable or truncated"):
        prepare_images(
            ImagePrepare(
                str(root), resolution=16, val_fraction=0.25, cache_dir=str(tmp_path / "d"), on_unreadable="error"
            )
        )
    with pytest.raises(DataError, match="neither elpv, fashion-mnist nor a folder"):
        resolve_images(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="at least one image"):
        ImageSampler(ImageDataset(skip, "train"), 0).next_batch(16, 0)


def test_the_real_datasets_where_installed(tmp_path):
    """elpv-dataset (PyPI) and Debian's dataset-fashion-mnist, read without a download: the labels match
    the published counts."""
    import importlib.util

    if importlib.util.find_spec("elpv_dataset") is None:
        pytest.skip("elpv-dataset is not installed (pip install elpv-dataset)")
    src = resolve_images("elpv")
    assert len(src.items) == 2624 and {it.label for it in src.items} == {0, 1, 2, 3}
    fm = Path("/usr/share/datasets/fashion-mnist")
    if fm.is_dir():
        f = resolve_images("fashion-mnist")
        assert len(f.items) == 70000 and sum(it.split == "val" for it in f.items) == 10000
