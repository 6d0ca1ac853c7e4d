"""Long-context evaluation: loss by context length and by position, and passkey retrieval.

:func:`loss_by_position` (mean next-token loss per position bucket); :func:`passkey_accuracy`
(RULER-style: a 5-digit key stated once at a chosen depth of held-out text, predicted greedily,
teacher-forced); :func:`inject_passkeys` (the ``passkey_fraction`` knob: training rows turned into such
examples); :func:`evaluate_run` (``rampup eval``: all of it for a run or checkpoint, at lengths beyond the
trained one too, with the RoPE method of the run's last stage). See docs/context.md.

Try it after ``rampup train configs/tiny.yaml``::

    rampup eval runs/tiny --lengths 64 256 512
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import yaml
from tokenizers import Tokenizer

from rampup.config import RunConfig, load_config
from rampup.data.dataset import TokenDataset
from rampup.data.mixture import first_folder
from rampup.data.passkey import (  # noqa: F401 (re-exported)
    NEEDLE,
    QUESTION,
    PasskeyTemplate,
    inject_passkeys,
    passkey_example,
)
from rampup.data.prepare import load_prepared_tokenizer
from rampup.data.samplers import EVAL_WINDOWS
from rampup.data.tokenizer import same_tokenizer
from rampup.engine.checkpoint.format import load_checkpoint
from rampup.engine.evaluation import evaluate_lengths, passkey_accuracy, window_batches
from rampup.engine.precision import autocast, saved_precision
from rampup.engine.runs import read_run
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError, DataError
from rampup.knobs.growth import fit_to_checkpoint
from rampup.models.adapter import ModuleAdapter
from rampup.models.build import build_adapter
from rampup.models.hf import HFCausalLMAdapter
from rampup.models.llm import DecoderLM
from rampup.models.rope import RopeSpec
from rampup.protocols import ModelAdapter, Task
from rampup.schedule.registry import KnobContext, KnobRunner
from rampup.schedule.stages import Schedule


@torch.no_grad()
def loss_by_position(
    model: ModelAdapter | nn.Module,
    windows: torch.Tensor,
    n_buckets: int = 8,
    *,
    precision: str = "auto",
    batch_tokens: int = 16384,
    task: Task | None = None,
) -> list[dict[str, float]]:
    """Mean loss per position bucket of ``windows`` (N, T + 1): [{start, end, loss}, ...].

    ``model`` is a ModelAdapter, or a plain module mapping token ids to logits; the loss is the
    task's own (per token, ``reduction='none'``)."""

    adapter = cast(ModelAdapter, model) if hasattr(model, "module") else ModuleAdapter(cast(nn.Module, model))
    task = task or CausalLM()
    module = adapter.module
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    T = windows.shape[1] - 1
    total = torch.zeros(T, dtype=torch.float64)
    for x, y in window_batches(windows, batch_tokens):
        batch = task.make_batch(x, y, training=False).to(device)
        with autocast(device, precision):
            nll = task.loss(adapter, batch, reduction="none")  # (b, T)
        total += nll.sum(0).double().cpu()
    module.train(was_training)
    per_pos = total / len(windows)
    edges = np.linspace(0, T, n_buckets + 1).astype(int)
    return [{"start": int(a), "end": int(b), "loss": float(per_pos[a:b].mean())} for a, b in pairwise(edges) if b > a]


def open_run(path: str | Path, command: str) -> tuple[Path, RunConfig, Schedule]:
    """(checkpoint folder, RunConfig, Schedule) of a run folder or one of its checkpoints."""
    saved = read_run(path, command)
    cfg = RunConfig.model_validate(saved.config)
    return saved.checkpoint, cfg, Schedule.build(cfg.schedule, total=cfg.train.duration)


def _data_config(data: str | Path) -> RunConfig:
    """The RunConfig whose corpus ``--data`` names: a run folder (its config.yaml) or a config file."""
    p = Path(data)
    if (p / "config.yaml").is_file():
        return RunConfig.model_validate(yaml.safe_load((p / "config.yaml").read_text()))
    if p.is_file():
        return load_config(p)
    raise ConfigError(f"--data {p} is neither a run folder (with config.yaml) nor a config file")


def _is_hf_folder(path: Path) -> bool:
    return (
        (path / "config.json").is_file() and not (path / "checkpoints").exists() and not (path / "state.json").exists()
    )


def _open_model(
    path: Path, rope: RopeSpec | None, data: str | Path | None
) -> tuple[ModelAdapter, RunConfig, dict[str, Any], str, int, dict[str, Any]]:
    """(adapter, cfg, knobs, precision, trained length, meta) of a checkpoint or an HF folder, with the
    config whose held-out data scores it (``data``: another run's or config's, of the same tokenizer)."""
    if _is_hf_folder(path):
        if data is None:
            raise ConfigError(
                f"{path} is a Hugging Face model folder: give --data RUN|CONFIG, the run or config "
                "whose held-out split to score it on"
            )
        return _hf_folder_model(path, _data_config(data), rope)
    adapter, cfg, knobs, precision, trained, meta = _checkpoint_model(path, rope)
    if data is not None:
        own = load_prepared_tokenizer(first_folder(cfg.data, prepare=True))
        cfg = _data_config(data)
        if not same_tokenizer(own, load_prepared_tokenizer(first_folder(cfg.data, prepare=True))):
            raise ConfigError(
                f"--data {data} is tokenized with another tokenizer than {path}'s run; score a "
                "model on data tokenized with its own tokenizer"
            )
    return adapter, cfg, knobs, precision, trained, meta


def _passkey_stream(val: TokenDataset, longest: int) -> np.ndarray:
    stream = np.concatenate([val.doc(i) for i in range(val.n_docs)])
    if len(stream) < longest + 2:
        raise DataError(
            f"the validation split has {len(stream)} tokens, too few for passkey filler at "
            f"{longest}; raise data.val_fraction"
        )
    return stream


def evaluate_run(
    path: str | Path,
    *,
    lengths: list[int] | None = None,
    passkey_samples: int = 10,
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    position_buckets: int = 8,
    max_tokens: int | None = None,
    windows: str | None = None,
    seed: int = 0,
    rope: RopeSpec | None = None,
    data: str | Path | None = None,
) -> dict[str, Any]:
    """Loss by length, loss by position at the longest length, and passkey accuracy of a checkpoint or
    of a Hugging Face model folder (the base model, or an export), through the engine's own evaluation
    with the knobs of the checkpoint's stage applied at each length. ``data`` (a run folder or config,
    required for a model folder) names the held-out split, tokenized with the model's own tokenizer;
    ``max_tokens`` and ``windows`` default to its eval settings; ``rope`` replaces the RoPE method (e.g.
    for zero-shot extrapolation). See docs/context.md.
    """

    path = Path(path)
    adapter, cfg, knobs, precision, trained, meta = _open_model(path, rope, data)
    max_tokens = max_tokens or cfg.eval.max_tokens
    windows = windows or cfg.eval.windows
    lengths = sorted(lengths or [max(1, trained // 4), trained, 2 * trained])
    prepared = first_folder(cfg.data, prepare=True)
    val = TokenDataset.open(prepared, "val")
    template = _template(prepared, meta, path, data)
    longest = max(lengths)
    model = adapter.module  # a DecoderLM: the model of a checkpoint of a run of the reference model
    if meta["kind"] == "checkpoint" and isinstance(model, DecoderLM) and longest > model.max_seq_len:
        model.set_rope(max_seq_len=longest)  # extend the RoPE tables (no weights change)
    task = CausalLM()
    runner = KnobRunner(KnobContext(adapter))
    make = EVAL_WINDOWS[windows]
    result = _record(meta, knobs, trained, data if data is not None else prepared, precision, max_tokens, windows)
    stream = _passkey_stream(val, longest) if passkey_samples else None

    def passkey(n: int, loss: float) -> None:
        if stream is None or n < template.min_len():
            return
        acc = passkey_accuracy(
            adapter, template, stream, [n], list(depths), passkey_samples, seed=seed, precision=precision
        )[n]
        result["passkey"][str(n)] = {f"{d:g}": a for d, a in acc.items()}

    made = {n: make(val, n, max_tokens) for n in lengths}
    result["scored"]["tokens"] = {str(n): int(w.shape[0] * (w.shape[1] - 1)) for n, w in made.items()}
    sets = {n: window_batches(w) for n, w in made.items()}
    losses = evaluate_lengths(adapter, task, runner, knobs, sets, precision=precision, each=passkey)
    result["loss"] = {str(n): v for n, v in losses.items()}
    runner.apply(knobs, longest)
    result["loss_by_position"] = {
        "seq_len": longest,
        "buckets": loss_by_position(
            adapter, make(val, longest, max_tokens), position_buckets, precision=precision, task=task
        ),
    }
    return result


def _template(prepared: Path, meta: dict[str, Any], path: Path, data: str | Path | None) -> PasskeyTemplate:
    """The passkey pieces of the scored data's tokenizer, which must be the model's own (its record leaves
    ``meta``)."""
    template = PasskeyTemplate(load_prepared_tokenizer(prepared))
    saved = meta.pop("tokenizer", None)
    if saved is not None and not same_tokenizer(saved, template.tok):
        raise ConfigError(
            f"{path}'s tokenizer differs from the one --data {data} was tokenized with; score it on "
            "data prepared with the model's own tokenizer (a run of this model, or a config "
            "whose model.path is this folder)"
        )
    return template


def _record(
    meta: dict[str, Any], knobs: dict[str, Any], trained: int, data: Any, precision: str, max_tokens: int, windows: str
) -> dict[str, Any]:
    """eval.json's header: what was scored (model, RoPE and attention, data, windows, precision)."""
    attention = "as configured"
    if "attention" in knobs:
        spec = knobs["attention"]
        attention = str(spec) + (f", window {knobs['window']}" if spec.kind != "causal" else "")
    return {
        **meta,
        "trained_seq_len": trained,
        "rope": str(knobs["rope"]) if "rope" in knobs else meta.get("rope", "as configured"),
        "attention": attention,
        "data": str(data),
        "precision": precision,
        "scored": {"max_tokens": max_tokens, "windows": windows, "tokens": {}},
        "loss": {},
        "passkey": {},
    }


def _checkpoint_model(
    path: Path, rope: RopeSpec | None
) -> tuple[ModelAdapter, RunConfig, dict[str, Any], str, int, dict[str, Any]]:
    """(adapter with the checkpoint's weights, its RunConfig, knobs at the checkpoint, precision, trained
    length, record fields) of a run folder or checkpoint."""

    ckpt, cfg, schedule = open_run(path, "rampup eval")
    adapter = build_adapter(cfg.model)
    fit_to_checkpoint(adapter, ckpt)  # a run that grew: the model at the checkpoint's depth
    ck = load_checkpoint(ckpt, adapter.module, None)
    tokens = int(ck.state["progress"]["tokens"])
    precision = saved_precision(ck.state, torch.device("cpu")).precision  # what the run trained in
    knobs = schedule.at(min(tokens, schedule.total_tokens - 1))
    if rope is not None:
        knobs = knobs | {"rope": rope}
    meta = {"kind": "checkpoint", "checkpoint": str(ckpt), "step": ck.state["progress"]["step"], "tokens": tokens}
    return adapter, cfg, knobs, precision, int(schedule.max_knob("seq_len")), meta


def _hf_folder_model(
    folder: Path, cfg: RunConfig, rope: RopeSpec | None
) -> tuple[ModelAdapter, RunConfig, dict[str, Any], str, int, dict[str, Any]]:
    """The same for a Hugging Face model folder scored on ``cfg``'s corpus: no knobs (its own config's RoPE
    and attention), fp32, trained length = its max_position_embeddings."""

    adapter = HFCausalLMAdapter.from_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder} has no tokenizer.json, so rampup cannot check it matches --data's tokenizer")
    knobs = {"rope": rope} if rope is not None else {}
    conf: Any = adapter.module.config  # a transformers config: its fields depend on the model family
    params = getattr(conf, "rope_parameters", None) or {}
    meta = {
        "kind": "hf_folder",
        "checkpoint": str(folder),
        "step": None,
        "tokens": None,
        "rope": params.get("rope_type", "default") + (f" x{params['factor']:g}" if params.get("factor") else ""),
        "tokenizer": Tokenizer.from_file(str(folder / "tokenizer.json")),
    }
    trained = int(getattr(conf, "max_position_embeddings", None) or conf.n_positions)
    return adapter, cfg, knobs, "fp32", trained, meta


def write_eval(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
