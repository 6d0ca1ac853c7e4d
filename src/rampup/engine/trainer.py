"""The training step, evaluation and the run's inputs, as plain functions for a loop of your own.

- :func:`optimizer_step`: one optimizer step of any task on any model adapter, at any batch shape,
  with gradient accumulation (the engine's step); :func:`train_step` is the same for a plain
  ``nn.Module`` that maps token ids to logits.
- :func:`evaluate`: held-out next-token loss of a plain module at one context length.
- :func:`prepare_run`: everything a run reads, checked before any compute (:class:`RunData`, the
  data seam: a schedule, a sampler and evaluation sets; a user may build one by hand).
- :func:`train`: the whole run from a :class:`RunConfig`, resumable (the loop is
  :class:`rampup.engine.loop.Trainer`).

Quick check on a CPU (about a minute)::

    rampup train configs/tiny.yaml
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rampup.config import RunConfig
from rampup.engine.evaluation import eval_loss, window_batches
from rampup.engine.state import Progress  # noqa: F401  (re-exported: where it used to live)
from rampup.errors import ConfigError, DataError, RampupError
from rampup.knobs import graph_id
from rampup.models.adapter import Batch, ModuleAdapter
from rampup.precision import autocast
from rampup.schedule import Schedule
from rampup.tasks import CausalLM


class Interrupted(RampupError):
    """Training stopped by a signal after writing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def optimizer_step(adapter, task, optimizer: torch.optim.Optimizer, batch: Batch, *, lr: float,
                   precision: str = "auto", micro_batch_items: int | None = None,
                   grad_clip: float | None = None) -> tuple[float, float]:
    """One optimizer step on ``batch``; returns (mean loss, grad norm before clipping).

    Each parameter group's lr is ``lr`` times the group's own ``lr_mult``. If the loss or the
    gradient norm is not finite the gradients are discarded and the optimizer is not stepped (its
    state is untouched); the returned values say so. A batch of more than ``micro_batch_items``
    items is split by rows and the gradients accumulated, each micro-batch weighted by its share of
    rows so the result equals the unsplit step.
    """
    B = batch.rows
    per_row = max(1, batch.items // B)
    rows = B if micro_batch_items is None else max(1, min(B, micro_batch_items // per_row))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    device = batch.inputs.device
    total = torch.zeros((), device=device)
    ctx = autocast(device, precision)
    for i in range(0, B, rows):
        part = batch.slice(i, i + rows)
        with ctx:
            loss = task.loss(adapter, part)
        loss = loss * (part.rows / B)
        loss.backward()
        total += loss.detach()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
    loss_value, norm_value = total.item(), norm.item()  # the one host sync of the step
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    precision: str = "auto",
    micro_batch_tokens: int | None = None,
    grad_clip: float | None = None,
    attn_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One optimizer step of a module mapping token ids (B, T) to logits; see :func:`optimizer_step`.

    ``attn_mask`` (B, 1, T, T) bool, ``segments`` (B, T) document ids and ``positions`` (B, T), when
    given, go to the model with their rows (document-masked packing).
    """
    extra = {k: v for k, v in (("attn_mask", attn_mask), ("positions", positions), ("segments", segments))
             if v is not None}
    return optimizer_step(ModuleAdapter(model), CausalLM(), optimizer, Batch(x, y, extra), lr=lr,
                          precision=precision, micro_batch_items=micro_batch_tokens, grad_clip=grad_clip)


def evaluate(model: torch.nn.Module, windows: torch.Tensor, *, precision: str = "auto",
             batch_tokens: int = 16384) -> float:
    """Mean next-token loss of a logits module over ``windows`` (N, T+1), every position scored."""
    return eval_loss(ModuleAdapter(model), CausalLM(), window_batches(windows, batch_tokens), precision=precision)


# ----------------------------------------------------------------------------------------------
# The data seam and what a run reads

@dataclass
class RunData:
    """What a run reads, checked before any compute: the data seam.

    ``sampler.take(step_plan)`` gives each step's raw (x, y); ``eval_sets`` maps an evaluation
    length to its batches of (x, y). Token corpora fill the rest (passkey resources); a run on other
    data leaves them None.
    """

    schedule: Schedule
    sampler: Any
    eval_sets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
    graphs: set[tuple] = field(default_factory=set)
    """Every compiled graph the run will need: batch shapes (micro-batches included) x knob graph keys."""
    train_ds: Any = None
    val_ds: Any = None
    eot_id: int | None = None

    @property
    def eval_lens(self) -> list[int]:
        return list(self.eval_sets)

    def passkey_template(self):
        from rampup.data.prepare import load_prepared_tokenizer
        from rampup.longeval import PasskeyTemplate

        if self.train_ds is None:
            raise ConfigError("passkey examples need a token corpus and its tokenizer (data.source)")
        return PasskeyTemplate(load_prepared_tokenizer(self.train_ds.folder))

    def passkey_stream(self):
        import numpy as np

        return np.concatenate([self.val_ds.doc(i) for i in range(self.val_ds.n_docs)])


RunInputs = RunData  # the name before the data seam


def micro_shapes(rows: int, seq_len: int, micro_batch_tokens: int | None) -> set[tuple[int, int]]:
    per = rows if micro_batch_tokens is None else max(1, min(rows, micro_batch_tokens // seq_len))
    return {(per, seq_len)} | ({(rows % per, seq_len)} if rows % per else set())


def check_graphs(cfg: RunConfig, graphs: set[tuple]) -> None:
    if cfg.train.compile and len(graphs) > cfg.train.compile_max_graphs:
        raise ConfigError(
            f"train.compile: the run needs {len(graphs)} compiled graphs (distinct batch shapes, and knob "
            f"values such as window that change a graph), more than train.compile_max_graphs "
            f"({cfg.train.compile_max_graphs}); its distinct batch shapes and window widths each compile their "
            "own graph; bucket the lengths (data.sampler: buckets, a seq_len ramp: step, or a coarser "
            "multiple_of), step the window, raise compile_max_graphs, or turn compile off")


def prepare_run(cfg: RunConfig) -> RunData:
    """Everything that can fail on bad input, done before any training compute."""
    from rampup.data.dataset import TokenDataset
    from rampup.data.prepare import get_prepared
    from rampup.data.samplers import EVAL_WINDOWS, sampler_for_run
    from rampup.plan import step_shapes

    prepared = get_prepared(cfg.data)
    train_ds = TokenDataset.open(prepared, "train", verify=cfg.data.verify_checksums)
    val_ds = TokenDataset.open(prepared, "val", verify=cfg.data.verify_checksums)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {train_ds.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set model.vocab_size >= {train_ds.vocab_size}")
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=train_ds.n_tokens)
    eval_lens = cfg.eval.seq_lens or [schedule.max_knob("seq_len")]
    for n in eval_lens:
        if val_ds.n_tokens < n + 1:
            raise DataError(f"the validation split has {val_ds.n_tokens} tokens, too few for eval at seq_len {n}; "
                            "raise data.val_fraction or lower eval.seq_lens")
    sampler = sampler_for_run(cfg.data, train_ds, cfg.train.seed, schedule)
    graphs: set[tuple] = set()
    for sp, (rows, seq_len) in zip(schedule.steps(), step_shapes(cfg, schedule)):  # buckets: the draws, dry
        graphs |= {graph_id(sp.knobs, s) for s in micro_shapes(rows, seq_len, cfg.train.micro_batch_tokens)}
    check_graphs(cfg, graphs)
    make_windows = EVAL_WINDOWS[cfg.eval.windows]
    eval_sets = {n: window_batches(make_windows(val_ds, n, cfg.eval.max_tokens)) for n in eval_lens}
    return RunData(schedule, sampler, eval_sets, graphs, train_ds, val_ds, train_ds.eot_id)


def train(cfg: RunConfig, *, resume: bool = False, display_mode: str | None = None, build_model=None,
          task=None, data: RunData | None = None) -> dict[str, Any]:
    """Run (or resume) a whole training run; returns the summary also written to summary.json.

    ``build_model(cfg, device) -> ModelAdapter`` (called once torch's RNG is seeded with
    train.seed), ``task`` and ``data`` replace the reference decoder LM, next-token prediction and
    the token corpus of ``cfg`` (tests/test_seams.py trains a vector classifier this way)."""
    from rampup.engine.loop import Trainer

    return Trainer(cfg, resume=resume, display_mode=display_mode, build_model=build_model, task=task,
                   data=data).run()
