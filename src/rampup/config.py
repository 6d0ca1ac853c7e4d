"""The run configuration: one typed section per concern, loaded from YAML and validated up front.

Everything a run can get wrong in its configuration (a typo in a key, a duration without a unit, a
stage longer than the model accepts) is caught here, before any data is read or any step runs, and
reported as a :class:`ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rampup.configbase import Section
from rampup.data.config import DataConfig
from rampup.data.images import ImagePrepare
from rampup.engine.config import EvalConfig, LogConfig
from rampup.engine.config import TrainConfig as EngineTrainConfig
from rampup.engine.initfrom import check_tokenizer
from rampup.engine.optim import OptimizerConfig
from rampup.errors import ConfigError, did_you_mean
from rampup.knobs.ema import EMAConfig
from rampup.models.llm import ModelConfig
from rampup.models.vision import VisionConfig
from rampup.schedule.registry import KNOBS, check_knobs
from rampup.schedule.stages import ScheduleConfig, StageConfig


class TrainConfig(EngineTrainConfig):
    """The training loop: budget, precision, device, checkpoints (rampup.engine.config), and the moving
    average of the weights (rampup.knobs.ema)."""

    ema: EMAConfig | None = None
    """An exponential moving average of the weights ({half_life: '20K tok', evaluate: false}), kept in every
    checkpoint; None: off."""


def hf_folder_tokenizer(folder: Path) -> tuple[str, str]:
    """(tokenizer.json path, eos token) of a Hugging Face model folder; ValueError naming what is missing."""

    fast = folder / "tokenizer.json"
    if not fast.is_file():
        raise ValueError(
            f"model.path {folder} has no tokenizer.json (a fast tokenizer); write one with "
            "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR), or set "
            "data.tokenizer.path"
        )
    eos = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None:
        raise ValueError(
            f"model.path {folder}: its tokenizer_config.json names no eos_token, which rampup needs "
            "to end every document; set data.tokenizer.eot to the model's end-of-text token"
        )
    return str(fast), eos


class ImagesConfig(Section):
    """An image classification run (docs/vision.md): its images and its model. The data section gives
    cache_dir and val_fraction; model (a language model's) is not used."""

    source: str
    """elpv (the elpv-dataset package), fashion-mnist (Debian's dataset-fashion-mnist) or a folder with one
    subfolder of images per class."""
    resolution: int = Field(default=64, ge=8, le=1024)
    """Pixels per side the images are decoded to once and cached at (centre-cropped square); the largest
    image_size a run trains at should not exceed it."""
    on_unreadable: Literal["skip", "error"] = "skip"
    """An image Pillow cannot decode (unreadable or truncated): skip leaves it out (listed in meta.json),
    error stops with its path."""
    model: VisionConfig = Field(default_factory=VisionConfig)
    """The classifier: a small ResNet or ViT (channels and classes come from the images)."""

    def prepare(self, data: DataConfig) -> ImagePrepare:
        return ImagePrepare(self.source, self.resolution, data.val_fraction, data.cache_dir, self.on_unreadable)


class RunConfig(Section):
    """A whole run. Sections: model, data, schedule, optimizer, train, eval, log; images for an image run."""

    name: str = "run"
    """Run name, used in out_dir and reports."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    images: ImagesConfig | None = None
    """An image classification run (its images and model) instead of a language model's."""

    @model_validator(mode="after")
    def _cross_check(self) -> RunConfig:
        if self.images is not None:
            check_knobs(self)  # the image family's checks (sizes, batches); no tokenizer, no seq_len
            return self

        tok = self.data.tokenizer
        if self.train.init_from is not None:
            check_tokenizer(self)  # the source's tokenizer, or a named refusal of another one
        if self.model.source == "hf" and self.model.path is not None and tok.path is None:
            # continued pre-training: the corpus is tokenized by the model's own tokenizer, ending
            # documents with its own eos
            tok.path, eos = hf_folder_tokenizer(Path(self.model.path))
            tok.eot = tok.eot or eos
        if tok.path is None:
            if "vocab_size" in tok.model_fields_set and tok.vocab_size != self.model.vocab_size:
                raise ValueError(
                    f"data.tokenizer.vocab_size {tok.vocab_size} differs from model.vocab_size "
                    f"{self.model.vocab_size}; set model.vocab_size only (the trained tokenizer follows it)"
                )
            tok.vocab_size = self.model.vocab_size
        if self.data.sampler == "buckets" and self.schedule.seq_len_mode == "truncate":
            raise ValueError(
                "schedule.seq_len_mode: truncate shapes packed windows; the buckets sampler "
                "draws its own lengths, so remove seq_len_mode"
            )
        check_knobs(self)  # each knob's own cross-checks (seq_len within the model, attention layers, ...)
        limit = self.model.max_seq_len  # after the seq_len check, which a rope-covered extension raises
        for n in self.eval.seq_lens:
            if n > limit:
                raise ValueError(f"eval.seq_lens has {n}, beyond model.max_seq_len {limit}")
        return self

    def resolved_out_dir(self) -> Path:
        return Path(self.train.out_dir.replace("{name}", self.name))


# ----------------------------------------------------------------------------------------------
# Loading, overrides and readable errors


def set_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict (list items by index: ``schedule.stages.1.seq_len=512``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set has an empty key in {path!r}")
    value = yaml.safe_load(raw) if raw.strip() else None
    node: Any = tree
    for i, part in enumerate(keys):
        last = i == len(keys) - 1
        key: str | int = part
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {path}: '{part}' is not an index of the {len(node)}-item list at "
                    f"{'.'.join(keys[:i]) or 'top level'}"
                )
            key = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {'.'.join(keys[:i])} is a value, not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and (key not in node or node[key] is None):
                node[key] = {}
            node = node[key]


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:

    cls: Any = RunConfig
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        if cls in (StageConfig, "knobs") and part in KNOBS:  # a knob's value: its own model, if structured
            cls = KNOBS[part].spec
        elif cls is ScheduleConfig and part == "knobs":
            cls = "knobs"
        else:
            field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
            cls = _section_class(field.annotation) if field else None
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def format_validation_error(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            valid = _valid_keys(loc[:-1])
            hint = did_you_mean(key, valid)
            where = ".".join(str(p) for p in loc[:-1]) or "the top level"
            lines.append(f"unknown key '{path}'{hint}; valid keys in {where}: {', '.join(valid)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) and e["type"] != "value_error" else ""
            lines.append(f"{path}: {msg}{shown}" if path else f"{msg}{shown}")  # cross-checks name their keys
    return ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))


_FILE_PATHS = (("model", "path"), ("data", "source"), ("data", "tokenizer", "path"), ("train", "init_from"))
"""Settings that name files: a relative path in a config file means relative to that file (``--set``
values stay relative to the current folder, where the user typed them)."""


def _resolve_paths(tree: dict[str, Any], folder: Path) -> None:
    for keys in _FILE_PATHS:
        node: Any = tree
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and value != "stdlib" and not Path(value).expanduser().is_absolute():
            node[keys[-1]] = str(folder / value)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, name: str | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if p.is_dir():
            inside = (
                " (a run folder: its config is " + str(p / "config.yaml") + ")" if (p / "config.yaml").is_file() else ""
            )
            raise ConfigError(
                f"config {p} is a folder, not a file{inside}; give the path of a YAML file (see configs/)"
            )
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; give the path of a YAML file (see configs/)")
        try:
            tree = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                "(a YAML config is text)"
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (model:, data:, schedule:, ...)")
        tree.setdefault("name", name or p.stem)
        _resolve_paths(tree, p.resolve().parent)
    for item in overrides:
        set_override(tree, item)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise format_validation_error(e, source) from None
    except ConfigError as e:
        raise ConfigError(f"invalid config {source}: {e}") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
