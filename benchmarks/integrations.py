"""rampup's bucket curriculum inside the Hugging Face Trainer against the Trainer's own fixed-length run.

Both arms are ``transformers.Trainer`` on the same tiny Llama (built from a ``LlamaConfig``, the shape of
configs/hf/llama_buckets.yaml: width 128, 4 layers, 1024 positions, vocabulary 2048), the same corpus
(the embedded stdlib corpus, tokenized once by rampup with its BPE tokenizer), the same token budget and
tokens per step, the same AdamW (betas 0.9/0.95, weight decay 0.1, clipping 1.0), 5% warmup and cosine
to 0.1x (the Trainer's own scheduler, over the same number of steps), fp32:

- ``hf_fixed``: what a Trainer user does today, the classic ``group_texts`` pipeline: the training
  documents concatenated and cut into 1024-token blocks, ``per_device_train_batch_size`` blocks per step,
  shuffled by the Trainer's sampler (cross-document attention);
- ``hf_buckets``: rampup's dataset decomposition through ``rampup.integrations``: ``RampupDataset``
  serves whole constant-token batches from length buckets 2^6..2^10 (every sequence from one document)
  with Grow-P2 odds in 8 cycles, and ``RampupCallback`` checks the Trainer and logs the knobs.

Both are scored by one evaluator (mean next-token loss on the same held-out 1024-token windows, rampup's
``eval_sets[1024]``) every ``--evals``-th of the run, from a Trainer callback; evaluation time is kept out
of the train time. Headline: ``time_to_target_ratio_buckets`` = the baseline's time to its own final loss
over the curriculum's time to that loss (median over seeds), with FLOPs to target and final losses.
Results: benchmarks/results/integrations.json. Run it alone on the machine::

    .venv/bin/python benchmarks/integrations.py             # 2 seeds x 2 arms, ~7 min on 2 cores
    .venv/bin/python benchmarks/integrations.py --quick     # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import yaml

from rampup.engine.precision import machine_info
from rampup.integrations.curriculum import Curriculum
from rampup.integrations.transformers import RampupCallback
from rampup.models.hf import HFCausalLMAdapter
from rampup.tools.compare import time_to_target

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "integrations.json"
L = 1024
HF_CONFIG = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": L,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


BUCKETS = {"min_log2": 6, "max_log2": 10, "cycles": 8}
"""Dataset decomposition's buckets 2^6..2^10 with 8 Grow-P2 cycles (the paper's best setting)."""


def run_tree(folder: Path, tokens: str, batch_tokens: int, lr: float, *, sampler: str = "buckets", **data: Any) -> dict:
    """A run config of the benchmark's model, corpus and optimizer (``data``: more of the data section);
    ``sampler`` fixed is concat-and-chunk at L, buckets the curriculum with Grow-P2 odds."""
    knobs: dict[str, Any] = {"batch_tokens": batch_tokens, "seq_len": L}
    if sampler == "buckets":
        knobs["bucket_odds"] = "grow-p2"
    return {
        "name": f"rampup_{sampler}",
        "model": {"source": "hf", "hf_config": {"model_type": "llama", **HF_CONFIG}},
        "data": {"source": "stdlib", "sampler": sampler, "buckets": BUCKETS, **data},
        "schedule": {"knobs": knobs},
        "optimizer": {"lr": lr, "warmup": "5%", "decay": "cosine", "min_lr_ratio": 0.1},
        "train": {
            "duration": tokens,
            "precision": "fp32",
            "checkpoint_every": None,
            "out_dir": str(folder / f"rampup_{sampler}"),
        },
        "eval": {"seq_lens": [L], "windows": "documents", "max_tokens": 16384},
        "log": {"progress": "off"},
    }


def run_config(folder: Path, tokens: str, batch_tokens: int, lr: float, **data: Any) -> Path:
    """The curriculum arm's run config file (the fixed arm reads the same prepared corpus and eval windows)."""
    path = folder / "hf_buckets.yaml"
    path.write_text(yaml.safe_dump(run_tree(folder, tokens, batch_tokens, lr, **data)))
    return path


class Blocks(torch.utils.data.Dataset):
    """``group_texts``: the training split's documents (each ending with EOT) concatenated, cut into
    L-token blocks; the model shifts the labels itself."""

    def __init__(self, cur: Curriculum):
        assert cur.data is not None and cur.data.train_ds is not None
        ds = cur.data.train_ds
        stream = torch.from_numpy(np.concatenate([s.astype("int64") for s in ds.shards]))
        self.blocks = stream[: len(stream) // L * L].view(-1, L)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class Scorer(transformers.TrainerCallback):
    """Evaluates at fixed steps, on the same windows for both arms; the train clock stops meanwhile."""

    def __init__(self, windows: list[tuple[torch.Tensor, torch.Tensor]], at: set[int], flops_of: Any):
        self.windows, self.at, self.flops_of = windows, at, flops_of
        self.evals: list[tuple[int, float, float, float]] = []
        self.tokens, self.flops, self.paused = 0, 0.0, 0.0

        self.step_seconds: list[float] = []  # from one step's end to the next's, evaluation left out

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.last = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now
        self.tokens, self.flops = self.flops_of(state.global_step)
        if state.global_step in self.at:
            t = time.perf_counter()
            loss = score(model, self.windows)
            self.evals.append((self.tokens, t - self.t0 - self.paused, self.flops, loss))
            print(f"    step {state.global_step}: {self.tokens} tok, {t - self.t0 - self.paused:.1f}s, loss {loss:.4f}")
            self.last = time.perf_counter()
            self.paused += self.last - t


@torch.no_grad()
def score(model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in windows:
        logits = model(input_ids=x).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        n += y.numel()
    model.train(was)
    return total / n


class _Trainer(transformers.Trainer):
    """The Trainer with a given per-step lr factor (its optimizer as it builds it): the engine's schedule, for
    a comparison of the loops alone. The Trainer's own warmup starts at lr 0 (the first step moves nothing)
    where rampup's engine and OLMo-core's trainer take the value at the end of the step."""

    def __init__(self, *args: Any, lr_lambda: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.lr_lambda = lr_lambda

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.lr_lambda)
        return self.lr_scheduler


def arm(
    name: str,
    cur: Curriculum,
    seed: int,
    steps: int,
    rows: int,
    lr: float,
    evals: int,
    out: Path,
    lr_lambda: Any = None,
) -> dict:
    """One Trainer run; ``lr_lambda`` (step -> factor of ``lr``) replaces the Trainer's own scheduler."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    per_token = HFCausalLMAdapter(model).flops_per_item
    settings = {
        "output_dir": str(out / f"{name}_s{seed}"),
        "max_steps": steps,
        "learning_rate": lr,
        # rampup's optimizer section as the Trainer spells it: 5% warmup, cosine to 0.1 x lr, AdamW
        # betas (0.9, 0.95), weight decay 0.1, gradients clipped at 1.0
        "warmup_steps": max(1, round(0.05 * steps)),
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "adam_beta2": 0.95,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "seed": seed,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_strategy": "no",
    }
    if name == "hf_fixed":
        train_ds: Any = Blocks(cur)
        collate: Any = transformers.default_data_collator
        settings["per_device_train_batch_size"] = rows

        def done(step: int) -> tuple[int, float]:
            return step * rows * L, step * rows * L * per_token((rows, L))

        shapes = [(rows, L)] * steps
    else:
        train_ds = cur.dataset()
        collate = train_ds.collate
        settings |= {"per_device_train_batch_size": 1, "ignore_data_skip": True, "remove_unused_columns": False}
        shapes = cur.data.step_shapes  # type: ignore[union-attr]
        cum = [(0, 0.0)]
        for r, t in shapes:
            cum.append((cum[-1][0] + r * t, cum[-1][1] + r * t * per_token((r, t))))

        def done(step: int) -> tuple[int, float]:
            return cum[step]

    at = {round(steps * (i + 1) / evals) for i in range(evals)}
    scorer = Scorer(cur.data.eval_sets[L], at, done)  # type: ignore[union-attr]
    args = transformers.TrainingArguments(**settings)
    kw: dict[str, Any] = {"model": model, "args": args, "train_dataset": train_ds, "data_collator": collate}
    if lr_lambda is None:
        trainer = transformers.Trainer(**kw, callbacks=[scorer])
    else:
        trainer = _Trainer(**kw, callbacks=[scorer], lr_lambda=lr_lambda)
    if name == "hf_buckets":
        RampupCallback(cur).bind(trainer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timed = [(t, r * t, sec) for (r, t), sec in zip(shapes, scorer.step_seconds, strict=True)]
    return run_record(name, seed, scorer.evals, wall, steps=timed[1:])  # the first step (start-up) left out


def run_record(
    arm: str,
    seed: int,
    evals: list[tuple[int, float, float, float]],
    wall: float,
    steps: list[tuple[int, int, float]] | None = None,
    **extra: Any,
) -> dict:
    """One run's result: its evaluations (tokens, train seconds, FLOPs, loss), the figures of the last and,
    from its timed ``steps`` (seq_len, tokens, seconds), tokens/s per length and the median step's
    tokens/s at each length (robust to a neighbour's burst on a shared machine, unlike the mean)."""
    tokens, train_time, flops, loss = evals[-1][:4]
    if steps:
        extra["tokens_per_s_by_seq_len"] = by_length(steps)
        extra["median_step_tokens_per_s_by_seq_len"] = median_by_length(steps)
    return {
        "arm": arm,
        "seed": seed,
        "evals": evals,
        "final_loss": loss,
        "train_time": train_time,
        "wall_time": wall,
        "tokens": tokens,
        "flops": flops,
        "tokens_per_s": tokens / train_time,
        **extra,
    }


def by_length(steps: list[tuple[int, int, float]]) -> dict[str, float]:
    """Tokens/s per sequence length over (seq_len, tokens, seconds) steps."""
    acc: dict[int, list[float]] = {}
    for T, n, sec in steps:
        a = acc.setdefault(T, [0.0, 0.0])
        a[0] += n
        a[1] += sec
    return {str(T): round(a[0] / a[1], 1) for T, a in sorted(acc.items())}


def median_by_length(steps: list[tuple[int, int, float]]) -> dict[str, float]:
    """The median step's tokens/s per sequence length over (seq_len, tokens, seconds) steps."""
    acc: dict[int, list[float]] = {}
    for T, n, sec in steps:
        acc.setdefault(T, []).append(n / sec)
    return {str(T): round(statistics.median(r), 1) for T, r in sorted(acc.items())}


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Per seed: the target is that seed's baseline final loss; ratios are baseline / curriculum."""
    rows = []
    for seed in sorted({r["seed"] for r in runs}):
        base = next(r for r in runs if r["seed"] == seed and r["arm"] == "hf_fixed")
        cur = next(r for r in runs if r["seed"] == seed and r["arm"] == "hf_buckets")
        target = base["final_loss"]
        tb, tc = time_to_target(base["evals"], target), time_to_target(cur["evals"], target)
        assert tb is not None
        rows.append(
            {
                "seed": seed,
                "target_loss": target,
                "baseline_time_to_target_s": tb["train_time"],
                "buckets_time_to_target_s": tc["train_time"] if tc else None,
                "time_to_target_ratio": tb["train_time"] / tc["train_time"] if tc else 0.0,
                "flops_to_target_ratio": tb["flops"] / tc["flops"] if tc else 0.0,
                "final_loss_buckets_minus_fixed": cur["final_loss"] - target,
                "tokens_per_s_ratio": cur["tokens_per_s"] / base["tokens_per_s"],
            }
        )
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    spread = lambda key: [min(r[key] for r in rows), max(r[key] for r in rows)]  # noqa: E731
    return {
        "time_to_target_ratio_buckets": med("time_to_target_ratio"),
        "time_to_target_ratio_buckets_spread": spread("time_to_target_ratio"),
        "flops_to_target_ratio_buckets": med("flops_to_target_ratio"),
        "final_loss_at_1024_buckets_minus_fixed": med("final_loss_buckets_minus_fixed"),
        "tokens_per_s_ratio_buckets_over_fixed": med("tokens_per_s_ratio"),
        "per_seed": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tokens", default="1M tok", help="token budget of each run (a duration with a unit)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--evals", type=int, default=10, help="evaluations per run, evenly spaced in steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 96K tokens, 4 evals; no results file")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.tokens, a.evals = 1, "96K tok", 4
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cur = Curriculum.from_yaml(run_config(out, a.tokens, a.batch_tokens, a.lr))
        steps = cur.num_steps
        rows = a.batch_tokens // L
        print(f"{steps} steps of {a.batch_tokens} tokens; {len(cur.data.eval_sets[L])} eval batches at {L}")  # type: ignore[union-attr]
        runs = []
        for seed in range(a.seeds):
            for name in ("hf_fixed", "hf_buckets"):
                print(f"  {name} seed {seed}", flush=True)
                if name == "hf_buckets":  # a fresh curriculum: the sampler's draws start from the config's seed
                    cur = Curriculum.from_yaml(out / "hf_buckets.yaml", [f"train.seed={seed}"])
                runs.append(arm(name, cur, seed, steps, rows, a.lr, a.evals, out))
    headline = summarise(runs)
    result = {
        "benchmark": "integrations",
        "machine": machine_info("fp32"),
        "setup": {
            "model": HF_CONFIG,
            "tokens": a.tokens,
            "batch_tokens": a.batch_tokens,
            "steps": steps,
            "lr": a.lr,
            "seeds": a.seeds,
            "eval": f"mean loss on rampup's eval_sets[{L}] (documents windows, 16384 tokens), {a.evals} evals",
            "transformers": transformers.__version__,
        },
        "headline": {k: v for k, v in headline.items() if k != "per_seed"},
        "per_seed": headline["per_seed"],
        "runs": runs,
    }
    print(json.dumps(result["headline"], indent=1))
    if not a.quick:
        RESULTS.write_text(json.dumps(result, indent=1))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
