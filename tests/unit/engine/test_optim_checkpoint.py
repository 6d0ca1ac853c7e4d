import json
import math
import resource
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from rampup.engine.checkpoint.format import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remove_partial_writes,
    save_checkpoint,
    verify_checkpoint,
)
from rampup.engine.optim import OptimizerConfig, build_optimizer, lr_at
from rampup.errors import CheckpointDamaged, CheckpointError, NonFiniteError
from rampup.models.llm import DecoderLM, ModelConfig

TOTAL = 1_000_000


def cfg(**kw):
    return OptimizerConfig.model_validate({"lr": 1e-3, "warmup": "10%", "min_lr_ratio": 0.1, **kw})


def test_warmup_then_cosine_in_tokens():
    c = cfg()
    assert lr_at(c, 0, TOTAL) == 0.0 and lr_at(c, 8192, TOTAL) == pytest.approx(1e-3 * 8192 / 100_000)
    assert lr_at(c, 50_000, TOTAL) == pytest.approx(0.5e-3)
    assert lr_at(c, 100_000, TOTAL) == pytest.approx(1e-3)
    mid = 100_000 + 450_000
    assert lr_at(c, mid, TOTAL) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(c, TOTAL, TOTAL) == pytest.approx(1e-4)


def test_linear_wsd_constant():
    assert lr_at(cfg(decay="linear"), 550_000, TOTAL) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    wsd = cfg(decay="wsd", cooldown="20%")
    assert lr_at(wsd, 799_999, TOTAL) == pytest.approx(1e-3)
    assert lr_at(wsd, 900_000, TOTAL) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    assert lr_at(cfg(decay="constant"), 990_000, TOTAL) == 1e-3


def test_weight_decay_only_on_matrices():
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    opt = build_optimizer(model, cfg(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _trained(seed=0):
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    opt = build_optimizer(model, cfg())
    x = torch.randint(0, 64, (2, 16))
    model(x).float().mean().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 7, model, opt, {"progress": {"step": 7}})
    model2, opt2 = _trained(seed=1)
    ck = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2)
    assert ck.state["progress"]["step"] == 7
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert s1["param_groups"] == s2["param_groups"]
    # no pickles anywhere: every file is safetensors or JSON
    for f in ck.path.iterdir():
        if f.suffix == ".safetensors":
            safetensors.torch.load_file(f)
        else:
            json.loads(f.read_text())


# Writes one checkpoint of a 256 KB layer in a real process, in either format; exit 4 when the write fails.
_SAVE_SCRIPT = """
import sys, torch
from pathlib import Path
from rampup.engine.distributed import Dist
from rampup.engine.checkpoint.format import save_checkpoint
from rampup.engine.checkpoint.sharded import save_sharded
from rampup.errors import CheckpointWriteError
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 256)).sum().backward()
opt.step()
folder, step, fmt = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
try:
    if fmt == "dcp":
        save_sharded(folder, step, model, opt, {"progress": {"step": step}}, Dist(), keep=3, parts={})
    else:
        save_checkpoint(folder, step, model, opt, {"progress": {"step": step}})
except CheckpointWriteError as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["single", "dcp"])
def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, fmt):
    """A full disk, for real: a file-size limit (RLIMIT_FSIZE) on the writing process."""
    ok = subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(tmp_path), "1", fmt], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    first = tmp_path / "step_0000001"
    before = {f: f.read_bytes() for f in first.rglob("*") if f.is_file()}
    res = subprocess.run(
        [sys.executable, "-c", _SAVE_SCRIPT, str(tmp_path), "2", fmt],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(100_000),
    )
    assert res.returncode == 4, res.stderr
    # torch.save (DCP's shard writer) reports the short write as a position mismatch, not EFBIG
    assert "could not write the checkpoint of step 2" in res.stderr and (
        "File too large" in res.stderr if fmt == "single" else "unexpected pos" in res.stderr
    )
    assert "step_0000001, is intact" in res.stderr and "--resume" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]  # no temporary folder left
    assert {f: f.read_bytes() for f in first.rglob("*") if f.is_file()} == before
    verify_checkpoint(first)
    assert (tmp_path / "latest").read_text().strip() == "step_0000001"


def test_manifest_catches_a_flipped_byte_and_a_cut(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json"}
    verify_checkpoint(path)
    blob = bytearray((path / "optimizer.safetensors").read_bytes())
    blob[-3] ^= 0x01  # one bit, inside a tensor: safetensors itself would load it without complaint
    (path / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointDamaged, match=r"optimizer\.safetensors does not match its sha256"):
        load_checkpoint(path, model, opt)
    path2 = save_checkpoint(tmp_path, 2, model, opt, {})
    with open(path2 / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointDamaged, match=r"model\.safetensors has 100 bytes, the manifest says \d+"):
        verify_checkpoint(path2)


def test_damaged_latest_is_reported_kept_and_the_previous_used(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 1, model, opt, {"progress": {"step": 1}})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    newest = save_checkpoint(tmp_path, 2, model, opt, {"progress": {"step": 2}})
    (newest / "state.json").write_text("{}")  # valid JSON, wrong content: only the checksum tells
    reports = []
    model2, opt2 = _trained(seed=3)
    ck = load_latest(tmp_path, model2, opt2, report=reports.append)
    assert ck.state["progress"]["step"] == 1
    assert all(torch.equal(good[k], v) for k, v in model2.state_dict().items())
    assert len(reports) == 1 and "step_0000002" in reports[0] and "state.json" in reports[0]
    assert "damaged_step_0000002" in reports[0]
    assert (tmp_path / "damaged_step_0000002" / "state.json").read_text() == "{}"  # kept, never deleted
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    (tmp_path / "step_0000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint.*damaged_step_0000001"):
        load_latest(tmp_path, model2, opt2, report=reports.append)


def test_nonfinite_weights_are_never_written(tmp_path):
    model, opt = _trained()
    first = save_checkpoint(tmp_path, 1, model, opt, {})
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 2: layers\.0\.attn\.q_proj\.weight hold NaN or inf"):
        save_checkpoint(tmp_path, 2, model, opt, {})
    assert list_checkpoints(tmp_path) == [first] and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_0000001",
    ]


def test_partial_writes_are_cleaned_up(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 1, model, opt, {})
    (tmp_path / ".tmp_step_0000002_999").mkdir()  # what SIGKILL mid-write leaves
    (tmp_path / ".tmp_step_0000002_999" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".latest.999").write_text("step_0000002")
    assert remove_partial_writes(tmp_path) == [".latest.999", ".tmp_step_0000002_999"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]


def test_keeps_the_last_n(tmp_path):
    model, opt = _trained()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]


def test_incomplete_or_mismatched_checkpoint_is_a_named_error(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 3, model, opt, {})
    other = DecoderLM(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, max_seq_len=16))
    with pytest.raises(CheckpointError, match="cannot load checkpoint .* into this model") as info:
        load_checkpoint(path, other, None)
    assert not isinstance(info.value, CheckpointDamaged)  # a wrong config is not damage: never quarantined
    (path / "state.json").unlink()
    with pytest.raises(CheckpointDamaged, match="state.json is missing"):
        load_checkpoint(path, model, opt)


def test_nothing_is_ever_unpickled():
    """Loading a checkpoint, a config or a dataset must not be able to run code: the source never
    calls a loader that unpickles (safetensors, JSON, yaml.safe_load and allow_pickle=False only). The
    one pickle is DCP's index of a sharded checkpoint, read by rampup.engine.checkpoint.sharded's restricted
    unpickler (tested below)."""
    import re
    from pathlib import Path

    import rampup

    unsafe = re.compile(
        r"\bpickle\b|\bmarshal\b|torch\.load\((?![^)]*weights_only=True)|"
        r"np\.load\((?![^)]*allow_pickle=False)|yaml\.(load|unsafe_load|full_load)\(|yaml\.(Unsafe)?Loader"
    )
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in Path(rampup.__file__).parent.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if unsafe.search(line)
    ]
    assert [f for f in found if not f.startswith("sharded.py:")] == []
    sharded_src = (Path(rampup.__file__).parent / "engine" / "checkpoint" / "sharded.py").read_text()
    assert "pickle.load(" not in sharded_src and "pickle.loads(" not in sharded_src


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/rampup_pwned",))


def _sharded(tmp_path, step, model, opt, parts=None, keep=None):
    from rampup.engine.checkpoint.sharded import save_sharded
    from rampup.engine.distributed import Dist

    return save_sharded(tmp_path, step, model, opt, {"progress": {"step": step}}, Dist(), keep=keep, parts=parts or {})


def test_sharded_checkpoint_round_trip_is_exact_and_reads_like_the_single_file_format(tmp_path):
    """torch.distributed.checkpoint in one process: weights, AdamW moments (keyed by name), parts and
    the RNG come back exactly; a tied weight is stored once; readers see the same tensors as in the
    single-file format."""
    from rampup.engine.checkpoint.format import model_shapes, model_tensors

    model, opt = _trained()
    ema = {"ema.tok_emb.weight": torch.randn(64, 32)}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    path = _sharded(tmp_path / "dcp", 7, model, opt, parts=ema)
    single = save_checkpoint(tmp_path / "single", 7, model, opt, {})
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == [
        "dcp/.metadata",
        "dcp/__0_0.distcp",
        "state.json",
    ]
    a, b = model_tensors(path), model_tensors(single)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # tied head/embedding once in both
    assert model_shapes(path) == model_shapes(single)
    torch.manual_seed(999)
    model2, opt2 = _trained(seed=1)
    ck = load_checkpoint(path, model2, opt2)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG state of the save
    assert ck.state["progress"]["step"] == 7 and torch.equal(
        ck.part_tensors["ema.tok_emb.weight"], ema["ema.tok_emb.weight"]
    )
    for x, y in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert model2.lm_head.weight is model2.tok_emb.weight  # still tied after the load
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert s1["param_groups"] == s2["param_groups"]


def test_a_damaged_shard_is_reported_kept_and_the_previous_checkpoint_used(tmp_path):
    from conftest import flip_bit

    model, opt = _trained()
    _sharded(tmp_path, 1, model, opt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    newest = _sharded(tmp_path, 2, model, opt)
    flip_bit(newest / "dcp" / "__0_0.distcp", 5000)
    reports = []
    model2, opt2 = _trained(seed=3)
    ck = load_latest(tmp_path, model2, opt2, report=reports.append)
    assert ck.state["progress"]["step"] == 1 and all(torch.equal(good[k], v) for k, v in model2.state_dict().items())
    assert len(reports) == 1 and "dcp/__0_0.distcp does not match its sha256" in reports[0]
    assert (tmp_path / "damaged_step_0000002" / "dcp" / "__0_0.distcp").is_file()  # kept, never deleted
    (tmp_path / "step_0000001" / "dcp" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointDamaged, match=r"dcp/__0_0\.distcp is missing"):
        verify_checkpoint(tmp_path / "step_0000001")


def test_sharded_checkpoints_refuse_nonfinite_weights_and_another_model(tmp_path):
    model, opt = _trained()
    first = _sharded(tmp_path, 1, model, opt, keep=3)
    other = DecoderLM(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, max_seq_len=16))
    with pytest.raises(
        CheckpointError,
        match=r"does not fit this model \(layers\.0\.attn\.k_proj\.weight is \[32, 32\] there but \[64, 64\] here",
    ) as info:
        load_checkpoint(first, other, None)
    assert not isinstance(info.value, CheckpointDamaged)
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 2: layers\.0\.attn\.q_proj\.weight hold NaN or inf"):
        _sharded(tmp_path, 2, model, opt, keep=3)
    assert list_checkpoints(tmp_path) == [first] and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_0000001",
    ]


def test_the_index_of_a_sharded_checkpoint_cannot_run_code(tmp_path):
    """DCP's .metadata is a pickle: rampup reads it with an unpickler that admits DCP's own dataclasses,
    torch sizes and dtypes, nothing callable."""
    import os
    import pickle

    from rampup.engine.checkpoint.sharded import read_metadata

    model, opt = _trained()
    path = _sharded(tmp_path, 1, model, opt)
    assert "model/lm_head.weight" in read_metadata(path).state_dict_metadata  # the real index reads
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    if os.path.exists("/tmp/rampup_pwned"):
        os.unlink("/tmp/rampup_pwned")
    with pytest.raises(CheckpointDamaged, match=r"\.metadata is unreadable \(posix\.system is not part of DCP"):
        read_metadata(path)
    assert not os.path.exists("/tmp/rampup_pwned")
