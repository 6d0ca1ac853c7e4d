"""The engine's config sections: the training loop (``train``), in-training evaluation (``eval``) and the
run's record (``log``). rampup.config assembles them with the other owners' sections into RunConfig (and
adds the fields knob families own, such as ``train.ema``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from rampup.configbase import Section, choice
from rampup.engine.faults import NonFiniteConfig
from rampup.units import Duration, Unit, parse_bytes

if TYPE_CHECKING:
    # A type checker cannot read a call as a type: to it each choice is the Literal that choice() builds.
    PrecisionChoice = Literal["auto", "bf16", "fp32"]
    StrategyChoice = Literal["ddp", "fsdp"]
    BackendChoice = Literal["auto", "gloo", "nccl"]
    CheckpointFormatChoice = Literal["auto", "dcp"]
    ProgressChoice = Literal["auto", "rich", "plain", "off"]
    WandbChoice = Literal["off", "offline", "online"]
else:
    PrecisionChoice = choice("auto", "bf16", "fp32")
    StrategyChoice = choice("ddp", "fsdp")
    BackendChoice = choice("auto", "gloo", "nccl")
    CheckpointFormatChoice = choice("auto", "dcp")
    ProgressChoice = choice("auto", "rich", "plain", "off")
    WandbChoice = choice("off", "offline", "online")


class TrainConfig(Section):
    """The training loop: budget, precision, device, checkpoints."""

    duration: Duration | None = None
    """Total training budget ('20M tok', '2 epochs', '1000 steps'). Omit to use the sum of the stage durations."""
    seed: int = 0
    """Seeds the model initialisation and the data order."""
    init_from: str | None = None
    """Start from existing weights: a run folder, one of its checkpoints, or a Hugging Face model folder
    (schedule, optimizer and data order fresh; the corpus is tokenized with the source's tokenizer)."""
    precision: PrecisionChoice = "auto"
    """Autocast dtype for matmuls: auto (bf16 where the hardware runs it natively -- AMX or AVX-512 bf16
    CPUs, recent GPUs -- measured once per machine; fp32 elsewhere), bf16 or fp32. Weights stay fp32.
    A resumed run keeps the precision it started with."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks cuda when available."""
    strategy: StrategyChoice = "ddp"
    """How a run under torchrun (more than one process) holds the model: ddp (DistributedDataParallel,
    every rank a replica) or fsdp (FSDP2: parameters, gradients and AdamW state sharded over the ranks).
    One process ignores it."""
    backend: BackendChoice = "auto"
    """torch.distributed backend: auto is nccl on CUDA GPUs and gloo on CPUs."""
    context_parallel: int = Field(default=1, ge=1)
    """Ranks one sequence is split over (context parallelism: ring attention over SDPA). 1: off. Not
    built yet: PyTorch's ring attention shards SDPA's CUDA flash / efficient kernels only, and rampup has
    had no GPUs to test it on, so any other value is refused with the reason before compute."""
    collective_timeout: float = Field(default=600.0, gt=0)
    """Seconds a collective may wait for the other ranks before the job fails (a rank that hangs)."""
    micro_batch_tokens: int | None = None
    """Most tokens in one forward/backward pass; larger steps are split and their gradients accumulated.
    None: no split."""
    out_dir: str = "runs/{name}"
    """Where checkpoints, metrics and plots go; {name} is replaced by the run name."""
    checkpoint_every: Duration | None = Duration(200, Unit.STEP)
    """How often to write a checkpoint, in steps, tokens or % of the run (None: only at the end)."""
    checkpoint_format: CheckpointFormatChoice = "auto"
    """auto: one process writes single-file safetensors checkpoints, several processes write
    torch.distributed.checkpoint (DCP) shards, each rank its own; dcp: shards in one process too.
    Either format resumes at any world size, and export, eval and teachers read both."""
    keep_checkpoints: int = Field(default=3, ge=1)
    """How many of the newest checkpoints to keep; older ones are deleted after each write
    (checkpoints found damaged are renamed damaged_step_N and never deleted)."""
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    """What a non-finite loss or gradient norm does: skip the step; a streak rolls back or stops."""
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
            parse_bytes(self.memory_limit, "train.memory_limit")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError("train.micro_batch_tokens must be >= 1, or null for no split")
        if self.checkpoint_every is not None and self.checkpoint_every.unit not in (
            Unit.STEP,
            Unit.TOKEN,
            Unit.FRACTION,
        ):
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
        if self.every is not None and (
            self.every.unit not in (Unit.STEP, Unit.TOKEN, Unit.FRACTION) or self.every.value == 0
        ):
            raise ValueError("eval.every takes a positive number of steps, tokens or % of the run")
        return self


class LogConfig(Section):
    """Metrics and the console."""

    progress: ProgressChoice = "auto"
    """Console display: a live rich display on a terminal, plain lines otherwise (auto), or off."""
    every: Duration = Duration(10, Unit.STEP)
    """How often the plain display prints a line (the metrics file gets every step)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to OUT_DIR/tensorboard (needs `pip install tensorboard`)."""
    wandb: WandbChoice = "off"
    """Also log to Weights & Biases in OUT_DIR/wandb (needs `pip install wandb`): offline writes files
    only (no network; `wandb sync` uploads them later), online streams to the server."""

    @model_validator(mode="after")
    def _check(self) -> LogConfig:
        if self.every.unit is not Unit.STEP or self.every.value < 1:
            raise ValueError("log.every is a whole number of steps, e.g. '10 steps'")
        return self
