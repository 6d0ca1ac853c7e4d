"""The logger seam: metrics.jsonl is canonical; TensorBoard and Weights & Biases (offline, no network)
mirror the same numbers through one interface."""

import json

import pytest

from conftest import tiny_tree
from rampup.config import RunConfig
from rampup.engine.loggers import scalars
from rampup.engine.records import read_metrics
from rampup.engine.trainer import train


def test_tensorboard_and_wandb_offline_mirror_the_metrics_file(data_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    tree = tiny_tree(
        data_cache,
        out,
        train={"duration": "6 steps", "checkpoint_every": None},
        log={"progress": "off", "tensorboard": True, "wandb": "offline"},
    )
    summary = train(RunConfig.model_validate(tree))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert tb_loss == [(r["tokens"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert acc.Scalars("eval/loss@256")[-1].value == pytest.approx(summary["val_loss"]["256"], rel=1e-6)

    (record,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    history = wandb_history(record)
    logged = [h for h in history if "train/loss" in h]
    assert [(h["tokens"], h["train/loss"]) for h in logged] == [(r["tokens"], pytest.approx(r["loss"])) for r in steps]
    assert [h["eval/loss@256"] for h in history if "eval/loss@256" in h][-1] == pytest.approx(
        summary["val_loss"]["256"]
    )


def wandb_history(path):
    """The history rows of an offline W&B run file: a 7-byte header, then records in LevelDB's log
    format (32 KiB blocks of chunks: crc32, length, type full/first/middle/last), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, records, part = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            part = chunk
        elif kind == 3:
            part += chunk
        elif kind == 4:
            records.append(part + chunk)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_mirrors_take_the_numbers_of_each_record_and_nothing_else():
    rec = {
        "event": "step",
        "step": 3,
        "tokens": 96,
        "loss": 2.5,
        "lr": 1e-3,
        "stage_name": "short",
        "compiled": True,
        "wall": 1.7e9,
        "grad_norm": float("nan"),
    }
    assert scalars(rec) == {"train/loss": 2.5, "train/lr": 1e-3}
    assert scalars({"event": "eval", "tokens": 9, "seq_len": 64, "loss": 3.0}) == {"eval/loss@64": 3.0}
    assert scalars({"event": "stage", "tokens": 0}) == {}


def test_a_missing_wandb_is_a_named_error_before_training(data_cache, tmp_path, monkeypatch):
    import builtins

    from rampup.errors import ConfigError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    tree = tiny_tree(data_cache, tmp_path / "out", log={"progress": "off", "wandb": "offline"})
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(RunConfig.model_validate(tree))
    assert not (tmp_path / "out" / "checkpoints").exists()
