"""``train.init_from``: a new run that starts from existing weights.

The source is a finished (or stopped) rampup run, one of its checkpoints, or a Hugging Face model
folder (``save_pretrained``: config.json, safetensors weights, tokenizer.json). Only the weights are
taken; the schedule, optimizer state, learning-rate schedule and data order start fresh, in a new
run folder. The new run tokenizes its corpus with the source's tokenizer (a tokenizer given in
``data.tokenizer.path`` must be the same one), so its token ids mean what the weights learned.

    rampup train configs/tiny.yaml --set train.init_from=runs/tiny --set train.out_dir=runs/tiny_more
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer

from rampup.data.mixture import first_folder
from rampup.data.prepare import TOKENIZER
from rampup.data.tokenizer import same_tokenizer
from rampup.engine.checkpoint.format import latest_checkpoint, model_tensors
from rampup.errors import ConfigError


@dataclass(frozen=True)
class InitSource:
    kind: str
    """``run`` (a rampup checkpoint) or ``hf`` (a Hugging Face model folder)."""
    path: Path
    """The checkpoint folder, or the model folder."""
    tokenizer: Path | None
    """The tokenizer.json its token ids belong to (None: not looked up)."""
    run_config: Any = None
    """The source run's RunConfig (kind ``run``)."""


def resolve(path: str | Path, config_cls: Any = None) -> InitSource:
    """What ``train.init_from`` names; a ConfigError says what is missing. ``config_cls`` (RunConfig, passed
    in so that this module does not import the config that imports it) reads a source run's config and
    finds its tokenizer; without it the source's tokenizer is not looked up."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"train.init_from {p} does not exist; give a run folder, one of its checkpoints "
            "(runs/NAME/checkpoints/step_N) or a Hugging Face model folder"
        )
    if (p / "config.json").is_file() and not (p / "checkpoints").exists():
        if not (p / "tokenizer.json").is_file():
            raise ConfigError(
                f"train.init_from {p} has no tokenizer.json: the new run must tokenize with the "
                "model's own tokenizer (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
            )
        return InitSource("hf", p, p / "tokenizer.json")
    ckpt, run = (p, p.parent.parent) if (p / "state.json").is_file() else (latest_checkpoint(p / "checkpoints"), p)
    if ckpt is None or not (run / "config.yaml").is_file():
        raise ConfigError(
            f"train.init_from {p} is neither a run folder with checkpoints, a checkpoint, nor a "
            "Hugging Face model folder (config.json)"
        )
    if config_cls is None:
        return InitSource("run", ckpt, None)
    cfg = config_cls.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    tok = Path(cfg.data.tokenizer.path) if cfg.data.tokenizer.path else first_folder(cfg.data) / TOKENIZER
    if not tok.is_file():
        raise ConfigError(
            f"train.init_from {p}: its tokenizer ({tok}) is not on this machine; prepare the "
            f"source run's corpus again (rampup prepare {run / 'config.yaml'}) or give "
            "data.tokenizer.path"
        )
    return InitSource("run", ckpt, tok, cfg)


def check_tokenizer(cfg: Any) -> None:
    """Set the new run's tokenizer to the source's, or refuse a different one (called while validating)."""
    src = resolve(cfg.train.init_from, type(cfg))
    assert src.tokenizer is not None  # resolve() given a config class always finds the source's tokenizer
    tok = cfg.data.tokenizer
    if tok.path is not None and not same_tokenizer(_load(Path(tok.path)), _load(src.tokenizer)):
        raise ConfigError(
            f"data.tokenizer.path {tok.path} is not the tokenizer of train.init_from "
            f"{cfg.train.init_from} ({src.tokenizer}): the weights' token ids would mean other "
            "text; remove data.tokenizer.path to use the source's"
        )
    tok.path = str(src.tokenizer)
    if src.run_config is not None:
        tok.eot = tok.eot or src.run_config.data.tokenizer.eot
    n = _load(src.tokenizer).get_vocab_size()
    if n > cfg.model.vocab_size:
        raise ConfigError(
            f"train.init_from {cfg.train.init_from}: its tokenizer has {n} tokens but "
            f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size to the source model's"
        )


def _load(path: Path) -> Tokenizer:

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for a malformed file
        raise ConfigError(f"{path} is not a readable tokenizer.json ({e})") from None


def load_weights(adapter: Any, init_from: str | Path) -> InitSource:
    """Copy the source's weights into the freshly built model (every tensor, same shapes, or a named error)."""
    src = resolve(init_from)
    if src.kind == "run":
        state = model_tensors(src.path)
    else:
        state = {}
        for f in sorted(src.path.glob("*.safetensors")):
            state |= load_file(str(f))
        if not state:
            raise ConfigError(f"train.init_from {src.path} has no safetensors weights")
        if hasattr(adapter, "from_hf_state_dict") and adapter.__class__.__name__ != "HFCausalLMAdapter":
            adapter.from_hf_state_dict(state)  # the reference model from a Llama folder, by HF names
            return src
    module = adapter.module
    own = module.state_dict()
    ptr = {k: v.data_ptr() for k, v in own.items()}
    tied = {k for k in own if k not in state and any(ptr[j] == ptr[k] and j in state for j in own)}  # stored once
    bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state) - tied)
    if bad or missing:
        raise ConfigError(
            f"train.init_from {init_from}: its weights do not fit this run's model ("
            + "; ".join([*(f"shape {b}" for b in bad[:3]), *(f"missing {m}" for m in missing[:3])])
            + "); describe the source's model in this config's model section"
        )
    with torch.no_grad():
        module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return src
