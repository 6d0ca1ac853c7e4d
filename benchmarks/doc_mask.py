"""Document-masked packing: the cost of stopping attention at document boundaries, per backend.

Packed windows (B, T) of real documents from the prepared stdlib corpus; every backend computes
the same thing (a token attends to the earlier tokens of its own document) except the reference:

- causal: plain causal SDPA, no document masking (the reference speed);
- masked: SDPA with the dense block-diagonal bool mask ``document_mask`` (B, 1, T, T);
- per_doc: ``per_document_attention``, one ``is_causal`` SDPA call per document slice
  (``DecoderLM(..., segments=seg)``);
- flex: ``flex_attention`` with ``document_block_mask``, forward only, eager (and compiled with
  ``--flex-compile``): torch 2.13 has no flex_attention backward on CPU (NotImplementedError as
  soon as an input requires grad; the JSON records the error the run got).

Two kinds of windows per T: ``corpus``, real FixedSampler windows (the stdlib's files are long,
so most rows hold one or two documents), and ``short_docs``, the corpus documents shorter than
``--short-cap`` tokens packed back to back (several documents per row, the harder case).

Two levels, each forward + backward, in fp32 and in bf16: the attention alone (q, k, v of
B x 4 heads x T x 64, bf16 tensors) and a whole DecoderLM (dim 256, 4 layers, 4 heads, vocab 4096,
cross-entropy loss, bf16 autocast). The time of a backend includes building its mask or spans
(and, for the model, segment ids and positions) from the tokens. Backends run interleaved, in a
rotating order, ``--repeats`` (``--model-repeats``) times after a warm-up call; the tables and
results/doc_mask.json report medians and the ratios of medians. On a shared machine check
``other_processes_cpu_s`` (per run and in total): per_doc issues many small kernels and suffers
far more than masked when another process takes a core. A run disturbed that way is run again
(``--retries``) after waiting for a quiet second (``--max-wait``); when the machine stays busy,
``--threads 1 --clock cpu`` times this process's CPU time on one thread, which other processes
hardly change.

Run it (about 3 minutes on 2 CPU cores; ``--quick`` for a smoke run)::

    .venv/bin/python benchmarks/doc_mask.py
    .venv/bin/python benchmarks/doc_mask.py --seq-lens 1024 --repeats 3
    .venv/bin/python benchmarks/doc_mask.py --threads 1 --clock cpu   # busy machine: ~9 minutes
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rampup.data import DataConfig, FixedSampler, TokenDataset, prepare
from rampup.data.packing import (
    document_block_mask,
    document_mask,
    document_positions,
    document_spans,
    per_document_attention,
    segment_ids,
)
from rampup.engine.precision import machine_info
from rampup.models import DecoderLM, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "doc_mask.json"
HEADS, HEAD_DIM = 4, 64
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def short_windows(ds: TokenDataset, B: int, T: int, cap: int, seed: int = 0) -> torch.Tensor:
    """(B, T) tokens of randomly drawn corpus documents shorter than ``cap``, packed back to back."""
    rng = np.random.default_rng(seed)
    short = np.flatnonzero(ds.doc_lengths < cap)
    docs, n = [], 0
    while n < B * T:
        docs.append(np.asarray(ds.doc(int(rng.choice(short)))))
        n += len(docs[-1])
    return torch.from_numpy(np.concatenate(docs)[: B * T].astype(np.int64)).view(B, T)


def describe(seg: torch.Tensor) -> dict:
    """Documents per row and their mean length (pieces cut by the window edges included)."""
    docs = (seg[:, -1] + 1).float()
    return {
        "docs_per_row": round(docs.mean().item(), 2),
        "mean_doc_len": round(seg.shape[1] / docs.mean().item(), 1),
        "sdpa_calls_per_layer": document_spans(seg).n_calls,
    }


def others_cpu_s() -> float:
    """CPU seconds all other processes have used since boot (Linux; 0 elsewhere): the difference
    over a run shows whether another process competed for the cores."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
        busy = f[0] + f[1] + f[2] + f[5] + f[6]  # user nice system irq softirq
    except (OSError, ValueError):
        return 0.0
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - own.user - own.system


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def timed(fn) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def wait_quiet(max_wait_s: float) -> float:
    """Wait (up to max_wait_s) for a second in which other processes use < 0.1 CPU s; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        before = others_cpu_s()
        time.sleep(1.0)
        if others_cpu_s() - before < 0.1:
            break
    return time.perf_counter() - t0


def interleave(fns: dict, repeats: int, warm: list[str] | None = None) -> dict[str, float]:
    """Median seconds of each fn after a warm-up call of those named in ``warm`` (default all),
    run ``repeats`` times in rotating order."""
    for n in fns if warm is None else warm:
        fns[n]()
    names, times = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        gc.collect()
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(timed(fns[n]))
    return {n: statistics.median(t) for n, t in times.items()}


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


def attention_level(segs: dict, B: int, T: int, dtype, repeats: int) -> tuple[dict, dict]:
    """Forward + backward of the attention alone; returns (median seconds, max |diff| vs masked)."""
    dt = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, HEADS, T, HEAD_DIM, generator=g, dtype=dt, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, HEADS, T, HEAD_DIM, generator=g, dtype=dt)

    def step(attend):
        def run():
            attend().backward(grad)
            q.grad = k.grad = v.grad = None

        return run

    fns = {"causal": step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    diffs = {}
    for name, seg in segs.items():
        fns[f"masked/{name}"] = step(lambda s=seg: F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(s)))
        fns[f"per_doc/{name}"] = step(lambda s=seg: per_document_attention(q, k, v, document_spans(s)))
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seg))
            diffs[f"per_doc/{name}"] = (per_document_attention(q, k, v, document_spans(seg)) - ref).abs().max().item()
    return interleave(fns, repeats), diffs


def flex_backward_error(seg: torch.Tensor) -> str:
    """What flex_attention says when asked for gradients on this device ("" if it can)."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, seg.shape[1], HEAD_DIM, requires_grad=True)
    try:
        flex_attention(q, q, q, block_mask=document_block_mask(seg[:1])).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"{type(e).__name__}: {e}"
    return ""


def flex_forward(seg: torch.Tensor, B: int, T: int, dtype, repeats: int, compiled: bool) -> tuple[dict, dict]:
    """Forward only (no grad) of masked SDPA, per-document SDPA and flex_attention (eager, and
    compiled if asked; the compile itself is left out of the timing)."""
    from torch.nn.attention.flex_attention import flex_attention

    dt = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, HEADS, T, HEAD_DIM, generator=g, dtype=dt) for _ in range(3))
    with torch.no_grad():
        fns = {
            "masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seg)),
            "per_doc": lambda: per_document_attention(q, k, v, document_spans(seg)),
            "flex_eager": lambda: flex_attention(q, k, v, block_mask=document_block_mask(seg)),
            "flex_block_mask_only": lambda: document_block_mask(seg),
        }
        if compiled:
            flex_compiled = torch.compile(flex_attention)
            fns["flex_compiled"] = lambda: flex_compiled(q, k, v, block_mask=document_block_mask(seg))
        times = interleave(fns, repeats)
        ref = fns["masked"]().float()
        diffs = {n: (fns[n]().float() - ref).abs().max().item() for n in ("flex_eager", "flex_compiled") if n in fns}
    return times, diffs


def model_level(model: DecoderLM, windows: dict, eot_id: int, dtype, repeats: int) -> tuple[dict, dict]:
    """Forward + backward of the whole model on next-token cross-entropy."""

    def step(x, y, inputs=dict):
        def run():
            with autocast(dtype):
                logits = model(x, **inputs())
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
            model.zero_grad(set_to_none=True)

        return run

    x0, y0 = next(iter(windows.values()))
    fns = {"causal": step(x0, y0)}
    diffs = {}
    for name, (x, y) in windows.items():

        def masked(x=x):
            seg = segment_ids(x, eot_id)
            return {"positions": document_positions(seg), "attn_mask": document_mask(seg)}

        def per_doc(x=x):
            seg = segment_ids(x, eot_id)
            return {"positions": document_positions(seg), "segments": seg}

        fns[f"masked/{name}"], fns[f"per_doc/{name}"] = step(x, y, masked), step(x, y, per_doc)
        with torch.no_grad(), autocast(dtype):
            ref = model(x, **masked()).float()
            diffs[f"per_doc/{name}"] = (model(x, **per_doc()).float() - ref).abs().max().item()
    first = next(iter(windows))
    return interleave(fns, repeats, warm=["causal", f"masked/{first}", f"per_doc/{first}"]), diffs


def ratios(times: dict, scenarios: list[str]) -> dict:
    out = {}
    for s in scenarios:
        m, p, c = times[f"masked/{s}"], times[f"per_doc/{s}"], times["causal"]
        out[s] = {
            "masked_sdpa_over_causal_time": round(m / c, 3),
            "per_doc_over_causal_time": round(p / c, 3),
            "per_doc_over_masked_sdpa_time": round(p / m, 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--seq-lens", type=int, nargs="+", default=[1024, 2048], help="window lengths T (default 1024 2048)"
    )
    ap.add_argument(
        "--batch-tokens", type=int, default=8192, help="tokens per step, B = batch_tokens / T (default 8192)"
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions at the attention level (default 5)")
    ap.add_argument("--model-repeats", type=int, default=3, help="timed repetitions at the model level (default 3)")
    ap.add_argument(
        "--short-cap", type=int, default=1024, help="short_docs packs documents shorter than this (default 1024)"
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=1,
        help="runs again a run during which other processes took > 10%% of the cores (default 1)",
    )
    ap.add_argument(
        "--max-wait",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for a quiet second (default 30)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core); 1 keeps clear of a process on the other core",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time with the wall clock (default) or this process's CPU time; with --threads 1 the "
        "CPU time hardly depends on other processes, so use 'cpu' on a busy machine",
    )
    ap.add_argument("--no-flex", action="store_true", help="skip the forward-only flex_attention comparison")
    ap.add_argument(
        "--flex-compile",
        action="store_true",
        help="also time torch.compile(flex_attention), forward only (adds ~20 s of compiling per precision)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: T 1024 only, 2 repeats")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_lens, args.repeats, args.model_repeats = [1024], 2, 1
    if any(args.batch_tokens % T for T in args.seq_lens):
        ap.error(f"--batch-tokens {args.batch_tokens} must be a multiple of every --seq-lens")
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    ds = TokenDataset.open(prepare(DataConfig(cache_dir=str(ROOT / ".rampup_cache"))), "train")
    mcfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=ds.vocab_size, max_seq_len=max(args.seq_lens))
    torch.manual_seed(0)
    model = DecoderLM(mcfg)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.batch_tokens} tokens per step, "
        f"{args.repeats} (attention) / {args.model_repeats} (model) repeats, medians in ms of {args.clock} time"
    )
    load_before, others_before = os.getloadavg()[0], others_cpu_s()
    t_start = time.perf_counter()
    runs = []
    for T in args.seq_lens:
        B = args.batch_tokens // T
        windows = {"corpus": FixedSampler(ds, seed=0, seq_len=T).next_batch(T, B)}
        xs = short_windows(ds, B, T + 1, args.short_cap)
        windows["short_docs"] = (xs[:, :-1].contiguous(), xs[:, 1:].contiguous())
        segs = {name: segment_ids(x, ds.eot_id) for name, (x, _) in windows.items()}
        shapes = {name: describe(seg) for name, seg in segs.items()}
        print(
            f"\nT={T}, B={B}: "
            + "; ".join(
                f"{n}: {d['docs_per_row']} docs/row, mean {d['mean_doc_len']} tokens, "
                f"{d['sdpa_calls_per_layer']} SDPA calls/layer"
                for n, d in shapes.items()
            )
        )
        for dname, dtype in DTYPES.items():
            for level in ("attention", "model"):
                for attempt in range(args.retries + 1):
                    waited = wait_quiet(args.max_wait)
                    others, wall = others_cpu_s(), time.perf_counter()
                    if level == "attention":
                        times, diffs = attention_level(segs, B, T, dtype, args.repeats)
                    else:
                        times, diffs = model_level(model, windows, ds.eot_id, dtype, args.model_repeats)
                    wall, others = time.perf_counter() - wall, others_cpu_s() - others
                    contended = args.clock == "wall" and others > 0.1 * wall * torch.get_num_threads()
                    if not contended or attempt == args.retries:
                        break
                    print(f"  ({level} {dname}: other processes used {others:.0f} CPU s in {wall:.0f} s, again)")
                run = {
                    "level": level,
                    "seq_len": T,
                    "batch_size": B,
                    "precision": dname,
                    "median_ms": {n: round(t * 1e3, 2) for n, t in times.items()},
                    "ratios": ratios(times, list(windows)),
                    "max_abs_diff_vs_masked": diffs,
                    "wall_s": round(wall, 1),
                    "other_processes_cpu_s": round(others, 1),
                    "contended": contended,
                    "attempts": attempt + 1,
                    "waited_for_quiet_s": round(waited, 1),
                }
                runs.append(run)
                print(
                    f"  {level:9} {dname}  causal {times['causal'] * 1e3:7.1f}   "
                    + "   ".join(
                        f"{s}: masked {times[f'masked/{s}'] * 1e3:7.1f} per_doc {times[f'per_doc/{s}'] * 1e3:7.1f} "
                        f"(per_doc/masked {r['per_doc_over_masked_sdpa_time']:.2f}, masked/causal "
                        f"{r['masked_sdpa_over_causal_time']:.2f})"
                        for s, r in run["ratios"].items()
                    )
                    + f"   [others used {run['other_processes_cpu_s']:.0f} of {run['wall_s']:.0f} s]"
                )

    flex = None
    if not args.no_flex:
        T = args.seq_lens[0]
        B = args.batch_tokens // T
        xs = short_windows(ds, B, T, args.short_cap)
        seg = segment_ids(xs, ds.eot_id)
        backward = flex_backward_error(seg)
        flex = {
            "seq_len": T,
            "batch_size": B,
            "windows": "short_docs",
            "backward_error": backward,
            "note": (
                "forward only, no grad: flex_attention's backward on this device fails with backward_error; "
                "eager flex_attention is an unfused reference that materialises the scores"
            ),
            "runs": [],
        }
        print(f"\nforward only, T={T}, B={B}, short_docs; flex_attention backward: {backward or 'works'}")
        for dname, dtype in DTYPES.items():
            wait_quiet(args.max_wait)
            others = others_cpu_s()
            times, diffs = flex_forward(seg, B, T, dtype, max(2, args.repeats // 2), args.flex_compile)
            flex["runs"].append(
                {
                    "precision": dname,
                    "median_ms": {n: round(t * 1e3, 2) for n, t in times.items()},
                    **{
                        f"{n}_over_masked_sdpa_time": round(times[n] / times["masked"], 3)
                        for n in ("per_doc", "flex_eager", "flex_compiled")
                        if n in times
                    },
                    "max_abs_diff_vs_masked": diffs,
                    "other_processes_cpu_s": round(others_cpu_s() - others, 1),
                }
            )
            print(
                f"  {dname}: "
                + "   ".join(f"{n} {t * 1e3:.1f}" for n, t in times.items())
                + "   max|diff| "
                + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items())
            )

    # Headline geometric means over the runs no other process disturbed (all runs if none was clean;
    # with the CPU clock no run counts as disturbed).
    uncontended = [r for r in runs if not r["contended"]]
    clean = uncontended or runs
    model_runs = [r for r in clean if r["level"] == "model"]

    def geomean(key: str, runs_: list) -> float:
        vals = [s[key] for r in runs_ for s in r["ratios"].values()]
        return round(math.exp(statistics.fmean(math.log(v) for v in vals)), 3)

    per_doc_wins = all(s["per_doc_over_masked_sdpa_time"] < 1 for r in clean for s in r["ratios"].values())
    result = {
        "machine": machine_info("fp32 and bf16, both timed"),
        "headline": {
            "faster_backend": "per_doc" if per_doc_wins else "mixed: see runs",
            "model_per_doc_over_masked_sdpa_time_geomean": geomean("per_doc_over_masked_sdpa_time", model_runs),
            "model_masked_sdpa_over_causal_time_geomean": geomean("masked_sdpa_over_causal_time", model_runs),
            "model_per_doc_over_causal_time_geomean": geomean("per_doc_over_causal_time", model_runs),
            "attention_per_doc_over_masked_sdpa_time_geomean": geomean(
                "per_doc_over_masked_sdpa_time", [r for r in clean if r["level"] == "attention"]
            ),
            "runs_used": (
                f"all {len(runs)} runs (CPU clock)"
                if args.clock == "cpu"
                else f"the {len(uncontended)} uncontended of {len(runs)} runs"
                if uncontended
                else f"all {len(runs)} runs, though every one was contended"
            ),
            "model": {f"{r['precision']}_T{r['seq_len']}_{s}": v for r in model_runs for s, v in r["ratios"].items()},
        },
        "runs": runs,
        "flex_forward_only": flex,
        "setup": {
            "batch_tokens": args.batch_tokens,
            "seq_lens": args.seq_lens,
            "repeats": args.repeats,
            "model_repeats": args.model_repeats,
            "clock": args.clock,
            "short_cap": args.short_cap,
            "attention_shape": f"B x {HEADS} x T x {HEAD_DIM}",
            "model": mcfg.model_dump(),
            "corpus": str(ds.folder.name),
            "eot_id": ds.eot_id,
            "windows": {
                "corpus": "FixedSampler(seed=0) first batch",
                "short_docs": f"documents < {args.short_cap} tokens packed back to back",
            },
            "timing": "forward + backward, medians over interleaved repeats after a warm-up call; "
            "each backend's time includes building its mask/spans (and positions) from the tokens",
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # CPU seconds other processes used during the run; next to wall_s x threads it says how
        # much of the machine they took (near 0 on a quiet machine)
        "other_processes_cpu_s": round(others_cpu_s() - others_before, 1),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - t_start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    h = result["headline"]
    print(
        f"\n  model fwd+bwd, geometric mean over T, precision and windows: per_doc/masked "
        f"{h['model_per_doc_over_masked_sdpa_time_geomean']:.2f}, masked/causal "
        f"{h['model_masked_sdpa_over_causal_time_geomean']:.2f}, per_doc/causal "
        f"{h['model_per_doc_over_causal_time_geomean']:.2f}; faster backend: {h['faster_backend']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"  wrote {args.out} ({result['wall_s']:.0f} s; other processes used "
        f"{result['other_processes_cpu_s']:.0f} CPU s meanwhile)"
    )
    return result


if __name__ == "__main__":
    main()
