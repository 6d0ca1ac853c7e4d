"""The run configuration: one typed section per concern, loaded from YAML and validated up front.

Everything a run can get wrong in its configuration (a typo in a key, a duration without a unit, a
stage longer than the model accepts) is caught here, before any data is read or any step runs, and
reported as a :class:`ConfigError` that names the key and the fix.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rampup.configbase import Section, choice
from rampup.data.config import DataConfig
from rampup.engine.faults import NonFiniteConfig
from rampup.engine.optim import OptimizerConfig
from rampup.errors import ConfigError, did_you_mean
from rampup.knobs.ema import EMAConfig
from rampup.models.llm import ModelConfig
from rampup.schedule.stages import ScheduleConfig
from rampup.units import Duration, Unit


class TrainConfig(Section):
    """The training loop: budget, precision, device, checkpoints."""

    duration: Duration | None = None
    """Total training budget ('20M tok', '2 epochs', '1000 steps'). Omit to use the sum of the stage durations."""
    seed: int = 0
    """Seeds the model initialisation and the data order."""
    init_from: str | None = None
    """Start from existing weights: a run folder, one of its checkpoints, or a Hugging Face model folder
    (schedule, optimizer and data order fresh; the corpus is tokenized with the source's tokenizer)."""
    precision: choice("auto", "bf16", "fp32") = "auto"
    """Autocast dtype for matmuls: auto (bf16 where the hardware runs it natively -- AMX or AVX-512 bf16
    CPUs, recent GPUs -- measured once per machine; fp32 elsewhere), bf16 or fp32. Weights stay fp32.
    A resumed run keeps the precision it started with."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks cuda when available."""
    strategy: choice("ddp", "fsdp") = "ddp"
    """How a run under torchrun (more than one process) holds the model: ddp (DistributedDataParallel,
    every rank a replica) or fsdp (FSDP2: parameters, gradients and AdamW state sharded over the ranks).
    One process ignores it."""
    backend: choice("auto", "gloo", "nccl") = "auto"
    """torch.distributed backend: auto is nccl on CUDA GPUs and gloo on CPUs."""
    context_parallel: int = Field(default=1, ge=1)
    """Ranks one sequence is split over (context parallelism: ring attention over SDPA). 1: off. Not
    built yet: PyTorch's ring attention shards SDPA's CUDA flash / efficient kernels only, and rampup has
    had no GPUs to test it on, so any other value is refused with the reason before compute."""
    collective_timeout: float = Field(default=600.0, gt=0)
    """Seconds a collective may wait for the other ranks before the job fails (a rank that hangs)."""
    micro_batch_tokens: int | None = None
    """Most tokens in one forward/backward pass; larger steps are split and their gradients accumulated. None: no split."""
    out_dir: str = "runs/{name}"
    """Where checkpoints, metrics and plots go; {name} is replaced by the run name."""
    checkpoint_every: Duration | None = Duration(200, Unit.STEP)
    """How often to write a checkpoint, in steps, tokens or % of the run (None: only at the end)."""
    checkpoint_format: choice("auto", "dcp") = "auto"
    """auto: one process writes single-file safetensors checkpoints, several processes write
    torch.distributed.checkpoint (DCP) shards, each rank its own; dcp: shards in one process too.
    Either format resumes at any world size, and export, eval and teachers read both."""
    keep_checkpoints: int = Field(default=3, ge=1)
    """How many of the newest checkpoints to keep; older ones are deleted after each write
    (checkpoints found damaged are renamed damaged_step_N and never deleted)."""
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    """What a non-finite loss or gradient norm does: skip the step; a streak rolls back or stops."""
    ema: EMAConfig | None = None
    """An exponential moving average of the weights ({half_life: '20K tok', evaluate: false}), kept in every
    checkpoint; None: off."""
    memory_limit: str | int | None = None
    """Memory a training step may use ('8GiB', '512MiB'), for the memory knobs' ``auto`` and the check
    that the model fits at all (None: the cgroup's limit or the machine's available memory)."""
    profile_every: int = Field(default=0, ge=0)
    """Profile every Nth step with torch.profiler (0: off): a ``profile`` record in metrics.jsonl with the
    step's seconds in forward, backward, optimizer and host work (the rest: data, knobs, Python)."""
    threads: int | None = Field(default=None, ge=1)
    """torch.set_num_threads for CPU training, at least 1 (None: PyTorch's default)."""
    compile: bool = False
    """torch.compile the model for training steps, one static graph per batch shape; the run's
    distinct shapes must stay within compile_max_graphs (bucketed lengths do, a fine seq_len ramp
    does not). Compile time is reported apart from train time."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor generates fused kernels; eager/aot_eager only trace)."""
    compile_max_graphs: int = Field(default=16, ge=1)
    """Most distinct batch shapes (compiled graphs) a compiled run may have; more is refused at plan time."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.memory_limit is not None:
            from rampup.units import parse_bytes

            parse_bytes(self.memory_limit, "train.memory_limit")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError("train.micro_batch_tokens must be >= 1, or null for no split")
        if self.checkpoint_every is not None and self.checkpoint_every.unit not in (Unit.STEP, Unit.TOKEN, Unit.FRACTION):
            raise ValueError("train.checkpoint_every takes steps, tokens or % of the run")
        if self.checkpoint_every is not None and self.checkpoint_every.value == 0:
            raise ValueError("train.checkpoint_every must be positive, or null for end-of-run only")
        return self


class EvalConfig(Section):
    """Validation loss on held-out documents, at one or more context lengths."""

    seq_lens: list[int] = []
    """Context lengths to evaluate at (empty: the longest seq_len of the schedule)."""
    every: Duration | None = None
    """How often to evaluate during training, in steps, tokens or %; the end of the run is always evaluated."""
    max_tokens: int = 32768
    """Held-out tokens scored per context length (fewer if the validation split is smaller)."""
    passkey_samples: int = Field(default=0, ge=0)
    """Passkey retrieval examples per (length, depth) at each evaluation (0: off); accuracy is logged."""
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Where the key sits in the window, as a fraction of its length."""
    windows: Literal["stream", "documents"] = "stream"
    """What an evaluation window is: `stream` cuts the held-out documents, concatenated, into
    windows (the fixed-length baseline's view); `documents` takes windows only from inside single
    held-out documents at least seq_len + 1 tokens long, so every position has its own document's
    full context (the fair test of a model trained without cross-document attention)."""

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if any(n < 1 for n in self.seq_lens):
            raise ValueError("eval.seq_lens must be positive")
        if any(not 0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError(f"eval.passkey_depths are fractions of the window, in [0, 1]; got {self.passkey_depths}")
        if self.max_tokens < 1:
            raise ValueError("eval.max_tokens must be positive")
        if self.every is not None and (self.every.unit not in (Unit.STEP, Unit.TOKEN, Unit.FRACTION) or self.every.value == 0):
            raise ValueError("eval.every takes a positive number of steps, tokens or % of the run")
        return self


class LogConfig(Section):
    """Metrics and the console."""

    progress: choice("auto", "rich", "plain", "off") = "auto"
    """Console display: a live rich display on a terminal, plain lines otherwise (auto), or off."""
    every: Duration = Duration(10, Unit.STEP)
    """How often the plain display prints a line (the metrics file gets every step)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to OUT_DIR/tensorboard (needs `pip install tensorboard`)."""
    wandb: choice("off", "offline", "online") = "off"
    """Also log to Weights & Biases in OUT_DIR/wandb (needs `pip install wandb`): offline writes files
    only (no network; `wandb sync` uploads them later), online streams to the server."""

    @model_validator(mode="after")
    def _check(self) -> LogConfig:
        if self.every.unit is not Unit.STEP or self.every.value < 1:
            raise ValueError("log.every is a whole number of steps, e.g. '10 steps'")
        return self


def hf_folder_tokenizer(folder: Path) -> tuple[str, str]:
    """(tokenizer.json path, eos token) of a Hugging Face model folder; ValueError naming what is missing."""
    import json

    fast = folder / "tokenizer.json"
    if not fast.is_file():
        raise ValueError(f"model.path {folder} has no tokenizer.json (a fast tokenizer); write one with "
                         "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR), or set "
                         "data.tokenizer.path")
    eos = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None:
        raise ValueError(f"model.path {folder}: its tokenizer_config.json names no eos_token, which rampup needs "
                         "to end every document; set data.tokenizer.eot to the model's end-of-text token")
    return str(fast), eos


class RunConfig(Section):
    """A whole run. Sections: model, data, schedule, optimizer, train, eval, log."""

    name: str = "run"
    """Run name, used in out_dir and reports."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _cross_check(self) -> RunConfig:
        from rampup.schedule.registry import check_knobs

        tok = self.data.tokenizer
        if self.train.init_from is not None:
            from rampup.engine.initfrom import check_tokenizer

            check_tokenizer(self)  # the source's tokenizer, or a named refusal of another one
        if self.model.source == "hf" and self.model.path is not None and tok.path is None:
            # continued pre-training: the corpus is tokenized by the model's own tokenizer, ending
            # documents with its own eos
            tok.path, eos = hf_folder_tokenizer(Path(self.model.path))
            tok.eot = tok.eot or eos
        if tok.path is None:
            if "vocab_size" in tok.model_fields_set and tok.vocab_size != self.model.vocab_size:
                raise ValueError(f"data.tokenizer.vocab_size {tok.vocab_size} differs from model.vocab_size "
                                 f"{self.model.vocab_size}; set model.vocab_size only (the trained tokenizer follows it)")
            tok.vocab_size = self.model.vocab_size
        if self.data.sampler == "buckets" and self.schedule.seq_len_mode == "truncate":
            raise ValueError("schedule.seq_len_mode: truncate shapes packed windows; the buckets sampler "
                             "draws its own lengths, so remove seq_len_mode")
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
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {path}: '{key}' is not an index of the {len(node)}-item list at "
                                  f"{'.'.join(keys[:i]) or 'top level'}")
            key = int(key)  # type: ignore[assignment]
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
    from rampup.schedule.registry import KNOBS
    from rampup.schedule.stages import ScheduleConfig, StageConfig

    cls: Any = RunConfig
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        if cls in (StageConfig, "knobs") and part in KNOBS:  # a knob's value: its own model, if structured
            cls = KNOBS[part].spec
        elif cls is ScheduleConfig and part == "knobs":
            cls = "knobs"
        else:
            field = cls.model_fields.get(part) if isinstance(cls, type) else None
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


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, name: str | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if p.is_dir():
            inside = " (a run folder: its config is " + str(p / "config.yaml") + ")" if (p / "config.yaml").is_file() else ""
            raise ConfigError(f"config {p} is a folder, not a file{inside}; give the path of a YAML file (see configs/)")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; give the path of a YAML file (see configs/)")
        try:
            tree = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                              "(a YAML config is text)") from None
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


