"""The image models beyond a plain forward: the ResNet's Once-for-All sub-networks (elastic depth per stage,
elastic inner width, running statistics left alone), multigrid's short cycle in the step shape, and the
plan's traced memory of an image step."""

import pytest
import torch
import torch.nn.functional as F

from rampup.config import RunConfig
from rampup.models.vision import ImageClassifierAdapter, ResNet
from rampup.protocols import Batch
from rampup.schedule.shapes import ImageShape
from rampup.schedule.stages import Schedule


def resnet() -> ResNet:
    torch.manual_seed(0)
    net = ResNet(3, 4, (16, 32), (3, 2))
    for m in net.modules():  # non-trivial statistics and scales, so a wrong slice shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net


def test_the_full_subnetwork_is_the_network_and_a_shallow_one_skips_each_stages_later_blocks():
    net = resnet().eval()
    x = torch.randn(2, 3, 16, 16)
    full = net.features(x)
    assert net.subnet_space() == (3, 32)
    net.active_depth, net.active_hidden = 3, 32
    assert torch.equal(net.features(x), full)
    net.active_depth, net.active_hidden = 1, None
    h = F.relu(net.stem(x))
    for i in (0, 3):  # the first block of each stage: blocks 0 (stage 1) and 3 (stage 2)
        h = net.blocks[i](h)
    assert torch.allclose(net.features(x), h.mean(dim=(2, 3)))
    assert not torch.allclose(net.features(x), full)


def test_a_narrow_subnetwork_uses_only_its_channels_and_leaves_the_running_statistics_alone():
    net = resnet().train()
    stats = {n: b.clone() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))}
    net.active_depth, net.active_hidden = 2, 16  # half of every block's inner channels
    y = net.head(net.features(torch.randn(4, 3, 16, 16)))
    assert {n: torch.equal(b, stats[n]) for n, b in net.named_buffers() if n in stats} == {n: True for n in stats}
    y.sum().backward()
    for i, b in enumerate(net.blocks):
        inner = b.conv1.out_channels // 2
        if net.position[i] >= 2:  # beyond the sub-network's depth: no gradient at all
            assert b.conv1.weight.grad is None
            continue
        assert b.conv1.weight.grad[inner:].abs().sum() == 0 and b.conv1.weight.grad[:inner].abs().sum() > 0
        assert b.conv2.weight.grad[:, inner:].abs().sum() == 0
    net.active_depth = net.active_hidden = None
    net.features(torch.randn(4, 3, 16, 16))  # the full network updates them
    assert not torch.equal(net.blocks[0].bn1.running_mean, stats["blocks.0.bn1.running_mean"])


def test_the_adapter_offers_subnetworks_only_where_the_model_has_them():
    assert ImageClassifierAdapter(resnet()).supports("subnet")
    from rampup.models.vision import ViT

    vit = ImageClassifierAdapter(ViT(3, 4, patch=8, dim=32, depth=1, heads=4, base_size=16))
    assert not vit.supports("subnet") and vit.supports("teacher")


def schedule(knobs: dict, multiple: int = 4) -> Schedule:
    cfg = RunConfig.model_validate(
        {"schedule": {"knobs": knobs, "stages": [{"name": "s"}]}, "train": {"duration": "96 samples"}}
    )
    return Schedule.build(cfg.schedule, total=cfg.train.duration, shape=ImageShape(multiple=multiple))


def test_the_short_cycle_takes_half_and_a_root_two_fraction_of_the_size_on_consecutive_steps():
    steps = list(schedule({"image_size": 32, "batch_size": 8, "short_cycle": "multigrid"}).steps())
    assert [sp.knobs["image_size"] for sp in steps[:6]] == [16, 20, 32, 16, 20, 32]  # 32/sqrt(2) = 22.6 -> 20
    assert [sp.batch_size for sp in steps[:3]] == [8, 8, 8]  # batch_scale constant: the same images
    mg = list(
        schedule({"image_size": 32, "batch_size": 8, "short_cycle": "multigrid", "batch_scale": "multigrid"}).steps()
    )
    assert [sp.batch_size for sp in mg[:3]] == [32, 20, 8]  # batch x H x W constant: 8 * 32^2 // 20^2 = 20
    vit = list(schedule({"image_size": 32, "batch_size": 8, "short_cycle": "multigrid"}, multiple=8).steps())
    assert [sp.knobs["image_size"] for sp in vit[:3]] == [16, 16, 32]  # a ViT's patch: 22 rounds down to 16
    plain = list(schedule({"image_size": 32, "batch_size": 8}).steps())
    assert {sp.knobs["image_size"] for sp in plain} == {32}
    with pytest.raises(ValueError, match="short_cycle' takes one of none, multigrid"):
        schedule({"image_size": 32, "batch_size": 8, "short_cycle": "fast"})


def test_the_plan_traces_an_image_steps_memory_and_it_grows_with_the_area():
    from rampup.tools.images import classifier_config, image_step_memory

    cfg = RunConfig.model_validate(
        {
            "images": {"source": "unused", "resolution": 64, "model": {"widths": [16, 32], "depths": [1, 1]}},
            "schedule": {"knobs": {"batch_size": 8, "image_size": 64}},
        }
    )
    small, big = (image_step_memory(cfg, 3, 4, 8, s, "fp32") for s in (16, 64))
    params = sum(p.numel() for p in classifier_config(cfg, 3, 4).build().parameters()) * 4
    assert (
        small.params == big.params == params and 0 <= small.optimizer - 2 * params < 1024
    )  # AdamW: two moments (and a step count per tensor)
    assert 12 < big.activations / small.activations < 17  # 16x the pixels; the gradients do not grow


def test_an_extracted_subnetwork_computes_what_it_computed_inside_the_full_network():
    from rampup.models.vision import VisionConfig, extract_subnetwork

    cfg = VisionConfig(channels=3, classes=4, widths=[16, 32], depths=[3, 2])
    torch.manual_seed(0)
    net = resnet().eval()  # the same architecture, with non-trivial statistics
    x = torch.randn(2, 3, 16, 16)
    net.active_depth, net.active_hidden = 2, 16
    inside = net.head(net.features(x))
    small_cfg, small = extract_subnetwork(cfg, net, 2, 16)
    assert small_cfg.depths == [2, 2] and small_cfg.inner == [8, 16]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    assert torch.allclose(small.eval().head(small.features(x)), inside, atol=1e-5)
    with pytest.raises(Exception, match="not inside this ResNet"):
        extract_subnetwork(cfg, net, 4, 16)


FACTORY = {
    "arch": "factory",
    "factory": "rampup.models.vision:ResNet",  # any importable constructor: torchvision.models:get_model ...
    "kwargs": {"channels": 3, "widths": [8, 16], "depths": [1, 1]},
    "classes_kwarg": "classes",
    "head": "head",
}


def test_a_classifier_from_an_importable_constructor_trains_behind_the_seam():
    from rampup.models.vision import ImageClassification, VisionConfig

    torch.manual_seed(0)
    adapter = ImageClassifierAdapter(VisionConfig.model_validate({**FACTORY, "classes": 3}).build())
    assert [n for n, _ in adapter.blocks()] == ["blocks.0", "blocks.1"]  # its stem, its stages
    assert adapter.flops_per_item((3, 16, 16)) > 0 and not adapter.supports("rope")
    task, opt = ImageClassification(), torch.optim.AdamW(adapter.module.parameters(), lr=1e-2)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 3  # one channel: repeated to the three it takes
    x[y == 1] += 1.0
    losses = []
    for _ in range(10):
        loss = task.loss(adapter, task.make_batch(x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    head = adapter.module.head
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3


@pytest.mark.parametrize(
    "change, words",
    [
        ({"factory": "no_such_package_xyz:build"}, "no_such_package_xyz cannot be imported"),
        ({"factory": "rampup.models.vision"}, "is not 'package.module:callable'"),
        ({"factory": "rampup.models.vision:nothing_here"}, "has no callable nothing_here"),
        ({"head": "stem"}, "has no linear classifier there"),
        ({"kwargs": {**FACTORY["kwargs"], "weights": "DEFAULT"}}, "would download weights"),
    ],
)
def test_bad_factory_classifiers_are_named(change, words):
    from rampup.errors import ConfigError
    from rampup.models.vision import VisionConfig

    with pytest.raises(ConfigError, match=words):
        VisionConfig.model_validate({**FACTORY, **change, "classes": 3}).build()


def test_torchvision_models_where_torchvision_imports():
    from rampup.errors import ConfigError
    from rampup.models.vision import VisionConfig

    cfg = VisionConfig.model_validate(
        {"arch": "factory", "factory": "torchvision.models:get_model", "kwargs": {"name": "resnet18", "weights": None}}
    )
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # absent, or a build for another torch (its compiled ops fail to load)
        with pytest.raises(ConfigError, match="torchvision.models cannot be imported"):
            cfg.build()
        pytest.skip(f"torchvision does not import here ({type(e).__name__}); the error names it (checked)")
    adapter = ImageClassifierAdapter(cfg.model_copy(update={"classes": 4}).build())
    assert adapter.module.head.out_features == 4
    assert adapter.forward(Batch(torch.randn(2, 3, 32, 32), torch.zeros(2, 1), {})).hidden.shape == (2, 1, 512)
