"""Engine overhead: tokens/s of ``rampup.engine.trainer.train`` against a bare PyTorch loop.

Both sides train the same ``DecoderLM`` (configs/demo_baseline.yaml's model, same seed), on
batches of the same shape (B, T) drawn from the same prepared corpus, in the precision
``train.precision: auto`` resolves to on this machine (``--precision`` overrides), AdamW
with the same hyper-parameters and gradient clipping, in the same process and thread count:

- engine: ``train(cfg)`` on demo_baseline.yaml with a fixed seq_len / batch_tokens, a budget of
  ``--steps`` steps, no intermediate eval or checkpoint and the display off. Its rate is taken
  from metrics.jsonl: tokens of steps 2..N / (wall of step N - wall of step 1). That window holds
  everything the engine does between steps (sampler, schedule, LR, metrics file, display) and
  leaves out start-up, the final eval and the final checkpoint.
- bare: a dozen lines of hand-written loop (random slices of the token memmap, forward,
  ``F.cross_entropy``, backward, ``clip_grad_norm_``, step, zero_grad, ``loss.item()``), timed
  over steps 2..N the same way.

Runs alternate engine, bare, engine, bare, ... so drift on a shared, noisy machine hits both
sides alike; the headline is the ratio of the median rates (``engine_over_bare``, target 0.97).
A second ratio, of the median step intervals, is less sensitive to stalls caused by other processes.
After the pairs, the bare loop runs alternately in fp32 and bf16 (``--precision-repeats``) to give
``bf16_over_fp32``: the tokens/s of the demo model in each precision on this machine, which is what
``auto`` bets on. Results go to benchmarks/results/throughput.json, with the machine they ran on.

Run it (about 3 minutes on 2 CPU cores; ``--quick`` for a ~1-minute smoke run)::

    .venv/bin/python benchmarks/throughput.py
    .venv/bin/python benchmarks/throughput.py --steps 30 --repeats 5 --seq-len 1024
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from rampup.config import RunConfig, load_config
from rampup.data.dataset import TokenDataset
from rampup.data.prepare import get_prepared
from rampup.engine.precision import autocast, machine_info, resolve_precision
from rampup.engine.records import read_metrics
from rampup.engine.trainer import train
from rampup.models.llm import DecoderLM

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "demo_baseline.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"
TARGET = 0.97


def hf_overrides(cfg: RunConfig) -> list[str]:
    """The same-shape Hugging Face LlamaForCausalLM as the reference model of ``cfg`` (model.source: hf)."""
    m = cfg.model
    hf = {
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "intermediate_size": m.hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_base,
        "tie_word_embeddings": m.tie_embeddings,
    }
    return ["model.source=hf", "model.hf_config=" + yaml.safe_dump(hf, default_flow_style=True).strip()]


def make_config(
    steps: int, seq_len: int, batch_tokens: int, out_dir: Path, precision: str = "auto", extra: list[str] = ()
) -> RunConfig:
    """demo_baseline.yaml at one fixed shape, ``steps`` steps long, with nothing between steps but training."""
    return load_config(
        BASE_CONFIG,
        [
            *extra,
            f"schedule.knobs.seq_len={seq_len}",
            f"schedule.knobs.batch_tokens={batch_tokens}",
            f"train.duration={steps} steps",
            "train.checkpoint_every=null",
            "train.device=cpu",  # the bare loop runs on the CPU too
            f"train.precision={precision}",
            f"train.out_dir={out_dir}",
            "eval.every=null",
            f"eval.seq_lens=[{seq_len}]",
            f"eval.max_tokens={seq_len}",  # one window: the final eval is outside the timed window anyway
            "log.progress='off'",  # quoted: bare YAML off is False
            f"data.cache_dir={ROOT / '.rampup_cache'}",  # the same cache whatever the working directory
        ],
    )


def rate(walls: list[float], tokens: list[int]) -> tuple[float, float]:
    """(tokens/s over steps 2..N, median seconds between step ends), given each step's end time
    and token count; step 1 is warm-up. The median interval shrugs off a stall caused by another
    process on a shared machine, which the plain rate absorbs in full."""
    return sum(tokens[1:]) / (walls[-1] - walls[0]), statistics.median(np.diff(walls).tolist())


def run_engine(
    steps: int, seq_len: int, batch_tokens: int, precision: str, extra: list[str] = ()
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="rampup-bench-") as tmp:
        cfg = make_config(steps, seq_len, batch_tokens, Path(tmp) / "run", precision, extra)
        summary = train(cfg, display_mode="off")
        recs = [r for r in read_metrics(Path(summary["metrics"])) if r.get("event") == "step"]
    assert len(recs) == steps and all(r["seq_len"] == seq_len for r in recs), "unexpected schedule"
    steps_tokens = [r["tokens"] - p for r, p in zip(recs, [0] + [r["tokens"] for r in recs[:-1]], strict=True)]
    return rate([r["wall"] for r in recs], steps_tokens)


def load_tokens(cfg: RunConfig) -> torch.Tensor:
    """The whole train split as one int64 tensor (read once, outside any timing)."""
    ds = TokenDataset.open(get_prepared(cfg.data), "train")
    return torch.from_numpy(np.concatenate([np.asarray(s) for s in ds.shards]).astype(np.int64))


def run_bare(cfg: RunConfig, data: torch.Tensor, steps: int, precision: str, hf: bool = False) -> tuple[float, float]:
    """The hand-written reference loop; same model, shapes, precision and optimizer settings
    (``hf``: the same-shape transformers LlamaForCausalLM instead of rampup's DecoderLM)."""
    T = cfg.schedule.knobs["seq_len"]
    B = cfg.schedule.knobs["batch_tokens"] // T
    oc = cfg.optimizer
    torch.manual_seed(cfg.train.seed)
    if hf:
        import transformers

        hf_cfg = yaml.safe_load(hf_overrides(cfg)[1].split("=", 1)[1])
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg), dtype=torch.float32
        )
    else:
        model = DecoderLM(cfg.model)
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": oc.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=oc.lr,
        betas=oc.betas,
        eps=oc.eps,
    )
    gen = torch.Generator().manual_seed(cfg.train.seed)
    walls = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        rows = torch.stack([data[s : s + T + 1] for s in starts.tolist()])  # (B, T+1)
        x, y = rows[:, :-1], rows[:, 1:]
        with autocast(torch.device("cpu"), precision):
            logits = model(x).logits if hf else model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, oc.grad_clip if oc.grad_clip else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the engine logs every step's loss, so both sides sync once per step
        walls.append(time.time())
    return rate(walls, [B * T] * steps)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per run; steps 2..N are timed (default 10)")
    ap.add_argument("--repeats", type=int, default=5, help="engine/bare pairs, run alternately (default 5)")
    ap.add_argument("--seq-len", type=int, default=512, help="fixed sequence length (default 512)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (default 4096)")
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="precision of the engine/bare pairs (default auto: what train.precision: auto picks here)",
    )
    ap.add_argument(
        "--precision-repeats",
        type=int,
        default=3,
        help="bare-loop fp32/bf16 pairs for bf16_over_fp32 (default 3; 0 skips)",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Llama arms")
    ap.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 2 repeats")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 6, 2
    if args.steps < 3 or args.repeats < 1:
        ap.error("--steps must be >= 3 and --repeats >= 1")
    if args.batch_tokens % args.seq_len:
        ap.error(f"--batch-tokens {args.batch_tokens} must be a multiple of --seq-len {args.seq_len}")

    cfg = make_config(args.steps, args.seq_len, args.batch_tokens, Path("unused"))
    data = load_tokens(cfg)  # also prepares the corpus on a first run, before anything is timed
    resolved = resolve_precision(args.precision, "cpu")
    prec = resolved.precision
    machine = machine_info(prec)
    print(
        f"{machine['cpu']} ({machine['cpu_capability']}), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {resolved.line()}\n{args.repeats} x (engine, bare), "
        f"{args.steps} steps of {args.batch_tokens // args.seq_len} x {args.seq_len} tokens, {prec}"
    )
    repeats = []
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    for i in range(args.repeats):
        gc.collect()
        e, e_step = run_engine(args.steps, args.seq_len, args.batch_tokens, prec)
        gc.collect()
        b, b_step = run_bare(cfg, data, args.steps, prec)
        repeats.append(
            {
                "engine_tok_per_s": round(e, 1),
                "bare_tok_per_s": round(b, 1),
                "ratio": round(e / b, 4),
                "engine_median_step_s": round(e_step, 4),
                "bare_median_step_s": round(b_step, 4),
            }
        )
        print(
            f"  repeat {i + 1}: engine {e:9,.0f} tok/s   bare {b:9,.0f} tok/s   ratio {e / b:.3f}   "
            f"median step {e_step:.3f} s vs {b_step:.3f} s"
        )
        if not args.no_hf:
            gc.collect()
            he, _ = run_engine(args.steps, args.seq_len, args.batch_tokens, prec, hf_overrides(cfg))
            gc.collect()
            hb, _ = run_bare(cfg, data, args.steps, prec, hf=True)
            repeats[-1] |= {
                "hf_engine_tok_per_s": round(he, 1),
                "hf_bare_tok_per_s": round(hb, 1),
                "hf_ratio": round(he / hb, 4),
            }
            print(f"            HF Llama: engine {he:9,.0f} tok/s   bare {hb:9,.0f} tok/s   ratio {he / hb:.3f}")

    eng = statistics.median(r["engine_tok_per_s"] for r in repeats)
    bare = statistics.median(r["bare_tok_per_s"] for r in repeats)
    ratio = eng / bare
    # Secondary, noise-robust view: ratio of the median step intervals (bare / engine).
    step_ratio = statistics.median(r["bare_median_step_s"] for r in repeats) / statistics.median(
        r["engine_median_step_s"] for r in repeats
    )
    by_precision: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(args.precision_repeats):
        for p in ("fp32", "bf16"):
            gc.collect()
            by_precision[p].append(round(run_bare(cfg, data, args.steps, p)[0], 1))
        print(
            f"  bare loop, pair {i + 1}: fp32 {by_precision['fp32'][-1]:9,.0f} tok/s   "
            f"bf16 {by_precision['bf16'][-1]:9,.0f} tok/s"
        )
    bf16_over_fp32 = (
        round(statistics.median(by_precision["bf16"]) / statistics.median(by_precision["fp32"]), 3)
        if args.precision_repeats
        else None
    )
    hf = {}
    if not args.no_hf:
        he = statistics.median(r["hf_engine_tok_per_s"] for r in repeats)
        hb = statistics.median(r["hf_bare_tok_per_s"] for r in repeats)
        hf = {
            "hf_engine_tok_per_s": round(he, 1),
            "hf_bare_tok_per_s": round(hb, 1),
            "hf_engine_over_bare": round(he / hb, 4),
            "reference_over_hf_llama_under_engine": round(eng / he, 4),
        }
        print(
            f"  HF Llama: engine/bare = {he / hb:.3f}; rampup DecoderLM / same-shape LlamaForCausalLM under "
            f"the engine = {eng / he:.3f}"
        )
    result = {
        "machine": machine,
        **hf,
        "engine_tok_per_s": round(eng, 1),
        "bare_tok_per_s": round(bare, 1),
        "engine_over_bare": round(ratio, 4),
        "engine_over_bare_by_median_step": round(step_ratio, 4),
        "repeats": repeats,
        "bf16_over_fp32": bf16_over_fp32,
        "bare_tok_per_s_by_precision": by_precision,
        "config": {
            "base": str(BASE_CONFIG.relative_to(ROOT)),
            "steps": args.steps,
            "timed_steps": args.steps - 1,
            "seq_len": args.seq_len,
            "batch_size": args.batch_tokens // args.seq_len,
            "batch_tokens": args.batch_tokens,
            "precision": prec,
            "model": cfg.model.model_dump(),
            "n_params": sum(p.numel() for p in DecoderLM(cfg.model).parameters()),
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        # 1-minute load average before and after: above the thread count, other processes shared the cores.
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - t_start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(
        f"\n  {'':8}{'tok/s (median)':>16}\n  {'engine':8}{eng:16,.0f}\n  {'bare':8}{bare:16,.0f}\n"
        f"  engine/bare = {ratio:.3f} (target {TARGET}: {'met' if ratio >= TARGET else 'NOT met'}); "
        f"per-repeat ratios {[r['ratio'] for r in repeats]}\n"
        f"  by median step interval: {step_ratio:.3f}\n"
        f"  bare loop bf16 / fp32 tokens/s on this machine: {bf16_over_fp32}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
