"""Side by side with the peers: OLMo-core's variable-length curriculum and the Hugging Face Trainer, on the
same work as rampup.

Six arms train the same Llama shape (width 128, 4 layers, 4 heads / 2 KV heads, SwiGLU 352, tied
embeddings, vocabulary 2048, L = 1024 positions) on the same documents (the embedded stdlib corpus,
tokenized once by rampup; ``--max-files`` sizes it so that one epoch of OLMo-core's decomposition is about
the budget, since its Grow-P2 cycles span its epoch while rampup's span the run), for the same tokens,
8192 tokens per step, AdamW lr 3e-3 (betas 0.9/0.95, weight decay 0.1, clipping 1.0), 5% warmup and
cosine to 0.1x (the Trainer is given the engine's per-step values: its own scheduler starts warmup at lr 0),
fp32, 2 threads, each run in a fresh process (runs in one process leaked into each other), the arms'
order rotated from seed to seed:

- ``hf_fixed``: ``transformers.Trainer`` on ``LlamaForCausalLM`` with ``group_texts`` blocks of L;
- ``hf_buckets``: the same Trainer with rampup's buckets + Grow-P2 (``rampup.integrations``);
- ``rampup_fixed`` / ``rampup_buckets``: rampup's engine on the same ``LlamaForCausalLM`` (``model.source:
  hf``), concat-and-chunk at L / dataset decomposition 2^6..2^10 with Grow-P2 odds in 8 cycles;
- ``olmo_fsl`` / ``olmo_vsl``: OLMo-core 3.0.0's own trainer, Llama-like transformer (SDPA) and data
  loader on gloo, ``NumpyFSLDataset`` / ``NumpyVSLDataset`` + ``VSLGrowP2Curriculum`` (benchmarks/peers_olmo.py).

One evaluator scores every arm: the mean next-token loss on rampup's held-out ``eval_sets[1024]`` (document
windows), called on the live model from each loop's own callback (the engine's arms use the engine's
evaluation, checked equal to it on the final model); evaluation time is kept out of train time. Reported
per arm (median over seeds): final loss, tokens/s over the run and the median step's tokens/s per sequence
length (the loops' own speed, robust to a neighbour's burst), time to a common target (the highest final
loss among the arms of that seed, so every arm reaches it), and ratios against ``hf_fixed``. For the
fixed-length arms, the model's own training step timed alone in the same process (``bare_step_s``) and
what the loop adds to it (``loop_overhead``). A peer that is not installed, or at a version the benchmark
was not written for, is skipped with a message naming it. Run it alone, with an interpreter where ai2-olmo-core imports
(see benchmarks/README.md: it pins older huggingface-hub, so it goes into its own environment)::

    PY=.venv-peers/bin/python
    $PY benchmarks/peers.py                    # 3 seeds x 6 arms, 786K tokens each, ~30 min on 2 cores
    $PY benchmarks/peers.py --seeds 1          # ~9 min
    $PY benchmarks/peers.py --quick            # smoke run, no results file
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

from integrations import BUCKETS, HF_CONFIG, L, run_record, run_tree, score  # benchmarks/integrations.py
from integrations import arm as hf_arm
from rampup.config import load_config
from rampup.engine.optim import lr_at
from rampup.engine.precision import machine_info
from rampup.engine.trainer import train as rampup_train
from rampup.integrations.curriculum import Curriculum
from rampup.models.build import build_adapter
from rampup.models.hf import HFCausalLMAdapter
from rampup.tools.compare import load_run, time_to_target

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "peers.json"
ARMS = ("hf_fixed", "hf_buckets", "rampup_fixed", "rampup_buckets", "olmo_fsl", "olmo_vsl")
PEERS = {
    "ai2-olmo-core": ("olmo_core", lambda v: v.split(".")[0] == "3", "3.x (written against 3.0.0)"),
    "transformers": ("transformers", lambda v: int(v.split(".")[0]) >= 5 or v >= "4.56", ">= 4.56"),
}


def peer_problem(dist_name: str) -> str | None:
    """Why a peer's arms cannot run here (not installed, another major version, does not import), or None."""
    module, fits, want = PEERS[dist_name]
    try:
        version = importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return (
            f"{dist_name} is not installed (pip install 'rampup[peers]' in its own environment): its arms are skipped"
        )
    if not fits(version):
        return f"{dist_name} {version} is installed; this benchmark needs {want}: its arms are skipped"
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install of an optional peer: name it, skip its arms
        return f"{dist_name} {version} does not import here ({type(e).__name__}: {e}): its arms are skipped"
    return None


def engine_arm(name: str, tree: dict, seed: int, windows: list, out: Path) -> dict[str, Any]:
    """rampup's engine on the run config ``tree``; the evaluator check: score() on the final model equals
    the engine's own last evaluation."""
    tree = {
        **tree,
        "name": name,
        "train": {
            **tree["train"],
            "seed": seed,
            "threads": torch.get_num_threads(),
            "out_dir": str(out / f"{name}_s{seed}"),
        },
        "eval": {**tree["eval"], "every": "10%"},
    }
    path = out / f"{name}_s{seed}.yaml"
    path.write_text(yaml.safe_dump(tree))
    held: list = []

    def build(c: Any, device: Any) -> Any:
        held.append(build_adapter(c.model, device))
        return held[-1]

    t0 = time.perf_counter()
    rampup_train(load_config(path), build_model=build, display_mode="off")
    wall = time.perf_counter() - t0
    run = load_run(out / f"{name}_s{seed}")
    ev = [tuple(e[:4]) for e in run.evals[L]]
    for e in ev:
        print(f"    {e[0]} tok, {e[1]:.1f}s, loss {e[3]:.4f}")
    pairs = zip(run.steps, run.steps[1:], strict=False)  # the first step (start-up) is left out
    steps = [(int(r["seq_len"]), r["tokens"] - p["tokens"], r["step_time"]) for p, r in pairs]
    return run_record(
        name,
        seed,
        ev,
        wall,
        steps=steps,
        evaluator_check_abs_diff=abs(score(held[-1].module, windows) - ev[-1][3]),
    )


def olmo_arm(name: str, seed: int, ctx: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    import peers_olmo  # noqa: PLC0415 (imports olmo_core: only when its arms run)

    per_token = ctx["flops_per_token"]
    return peers_olmo.train(
        name,
        tokens_file=ctx["tokens_file"],
        eos=ctx["eos"],
        hf=HF_CONFIG,
        L=L,
        min_log2=BUCKETS["min_log2"],
        cycles=BUCKETS["cycles"],
        budget=ctx["budget"],
        batch_tokens=a.batch_tokens,
        lr=a.lr,
        seed=seed,
        evals=a.evals,
        evaluate=lambda m: score(_Logits(m), ctx["windows"]),
        flops_of=per_token,
        out=ctx["out"],
    )


class _Logits(torch.nn.Module):
    """OLMo-core's transformer returns the logits tensor; the evaluator reads ``.logits`` as from HF."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        return type("Out", (), {"logits": self.model(input_ids)})()


def prepare(a: argparse.Namespace, out: Path, skip: dict[str, str]) -> dict[str, Any]:
    """The shared corpus (prepared and cached by rampup once) and budget; the OLMo-core token file when its
    arms run."""
    tree = run_tree(out, f"{a.tokens} tok", a.batch_tokens, a.lr, max_files=a.max_files)
    cur = Curriculum.from_yaml(_write(out / "probe.yaml", tree))
    data = cur.data
    assert data is not None and data.train_ds is not None
    ctx: dict[str, Any] = {
        "out": out,
        "eos": data.eot_id,
        "corpus_tokens": data.train_ds.n_tokens,
    }
    budget = a.tokens
    if "ai2-olmo-core" not in skip:
        import peers_olmo  # noqa: PLC0415 (imports olmo_core: only when its arms run)

        ctx["tokens_file"] = out / "olmo_tokens.bin"
        peers_olmo.write_documents(ctx["tokens_file"], data.train_ds.shards)
        epoch = peers_olmo.epoch_tokens(
            "olmo_vsl",
            ctx["tokens_file"],
            data.eot_id,
            HF_CONFIG["vocab_size"],
            L,
            BUCKETS["min_log2"],
            BUCKETS["cycles"],
            a.batch_tokens,
        )
        ctx["olmo_vsl_epoch_tokens"] = epoch
        budget = min(budget, epoch)  # OLMo-core's Grow-P2 cycles span one epoch: the run stays inside it
    ctx["budget"] = budget // a.batch_tokens * a.batch_tokens
    return ctx


def arm_context(ctx_file: Path) -> dict[str, Any]:
    """What one arm's process needs: the prepared context (written by the parent), the held-out windows
    (rampup's data preparation again, from its cache) and the model's FLOPs per token."""
    ctx: dict[str, Any] = json.loads(ctx_file.read_text())
    ctx["out"] = Path(ctx["out"])
    if "tokens_file" in ctx:
        ctx["tokens_file"] = Path(ctx["tokens_file"])
    data = Curriculum.from_yaml(ctx["out"] / "probe.yaml").data
    assert data is not None
    ctx["windows"] = data.eval_sets[L]
    per_item = HFCausalLMAdapter(transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))).flops_per_item
    ctx["flops_per_token"] = lambda T: per_item((1, T))
    return ctx


def run_isolated(name: str, seed: int, ctx_file: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One arm in a fresh Python process: arms run in one process leaked into each other (a process group,
    the garbage collector's state, allocator and thread-pool warmth moved same-arm throughput by 15-30%)."""
    result = ctx_file.parent / f"{name}_s{seed}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm-worker", f"{name}:{seed}:{ctx_file}"]
    cmd += ["--batch-tokens", str(a.batch_tokens), "--lr", str(a.lr), "--evals", str(a.evals)]
    cmd += ["--threads", str(a.threads), "--max-files", str(a.max_files)]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def arm_worker(spec: str, a: argparse.Namespace) -> None:
    name, seed, ctx_file = spec.split(":", 2)
    ctx = arm_context(Path(ctx_file))
    bare = bare_step_s(name, a.batch_tokens // L) if name in FIXED_ARMS else None
    record = run_arm(name, int(seed), ctx, a)
    if bare is not None:  # where the loop's step goes: the model's own step, and the rest
        step = a.batch_tokens / record["median_step_tokens_per_s_by_seq_len"][str(L)]
        record |= {"bare_step_s": bare, "median_step_s": step, "loop_overhead": step / bare - 1}
    (Path(ctx_file).parent / f"{name}_s{seed}.result.json").write_text(json.dumps(record))


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def run_arm(name: str, seed: int, ctx: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    out, budget = ctx["out"], f"{ctx['budget']} tok"
    assert not torch.distributed.is_initialized(), "a process group left behind would wrap the next arm in DDP"
    if name.startswith("olmo"):
        return olmo_arm(name, seed, ctx, a)
    sampler = "buckets" if name.endswith("buckets") else "fixed"
    tree = run_tree(out, budget, a.batch_tokens, a.lr, sampler=sampler, max_files=a.max_files)
    if name.startswith("rampup"):
        return engine_arm(name, tree, seed, ctx["windows"], out)
    tree["train"]["seed"] = seed
    path = _write(out / f"{name}_s{seed}.yaml", {**tree, "name": name})
    cur = Curriculum.from_yaml(path)
    # the engine's schedule (its lr at the end of each step), so that the loops differ in nothing else
    opt, total, steps = load_config(path).optimizer, ctx["budget"], cur.num_steps
    engine_lr = lambda k: lr_at(opt, (k + 1) * a.batch_tokens, total) / a.lr  # noqa: E731
    return hf_arm(name, cur, seed, steps, a.batch_tokens // L, a.lr, a.evals, out, lr_lambda=engine_lr)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed a common target (the highest final loss of the seed's arms); medians over seeds."""
    arms = sorted({r["arm"] for r in runs}, key=ARMS.index)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in sorted({r["seed"] for r in runs}):
        mine = {r["arm"]: r for r in runs if r["seed"] == seed}
        target = max(r["final_loss"] for r in mine.values())
        hits = {n: time_to_target(r["evals"], target) for n, r in mine.items()}
        per_seed[seed] = {"target": target, **{n: (h or {}).get("train_time") for n, h in hits.items()}}
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    table = {}
    for n in arms:
        mine = [r for r in runs if r["arm"] == n]
        ttt = [per_seed[r["seed"]][n] for r in mine if per_seed[r["seed"]][n] is not None]
        lengths = sorted({T for r in mine for T in r.get("median_step_tokens_per_s_by_seq_len", {})}, key=int)
        table[n] = {
            "final_loss": med([r["final_loss"] for r in mine]),
            "tokens_per_s": med([r["tokens_per_s"] for r in mine]),
            "time_to_common_target_s": med(ttt),
            "tokens_per_s_by_seq_len": mine[0].get("tokens_per_s_by_seq_len"),
            "loop_overhead": med([r["loop_overhead"] for r in mine if "loop_overhead" in r]),
            "bare_step_s": med([r["bare_step_s"] for r in mine if "bare_step_s" in r]),
            "median_step_tokens_per_s_by_seq_len": {
                T: med(
                    [
                        r["median_step_tokens_per_s_by_seq_len"][T]
                        for r in mine
                        if T in r.get("median_step_tokens_per_s_by_seq_len", {})
                    ]
                )
                for T in lengths
            },
        }
    head: dict[str, Any] = {}
    base = table.get("hf_fixed")
    for n, row in table.items():
        if base and n != "hf_fixed" and row["time_to_common_target_s"] and base["time_to_common_target_s"]:
            head[f"time_to_target_ratio_hf_fixed_over_{n}"] = (
                base["time_to_common_target_s"] / row["time_to_common_target_s"]
            )
    pairs = [
        ("rampup_fixed", "hf_fixed"),
        ("olmo_fsl", "rampup_fixed"),
        ("olmo_vsl", "rampup_buckets"),
        ("rampup_buckets", "hf_buckets"),
    ]
    for x, y in pairs:
        if x in table and y in table:
            head[f"tokens_per_s_ratio_{x}_over_{y}"] = table[x]["tokens_per_s"] / table[y]["tokens_per_s"]
    # the loops' own speed: the median step's tokens/s at the same length, per seed (arms of a seed ran
    # one after another, each in a fresh process), median and range over seeds
    for x, y in pairs:
        for T in (str(L), str(1 << BUCKETS["min_log2"])):
            per = [_step_rate(runs, x, s, T) / _step_rate(runs, y, s, T) for s in per_seed if _both(runs, x, y, s, T)]
            if per:
                head[f"step_tokens_per_s_ratio_at_{T}_{x}_over_{y}"] = statistics.median(per)
                head[f"step_tokens_per_s_ratio_at_{T}_{x}_over_{y}_range"] = [min(per), max(per)]
    if "olmo_vsl" in table and "rampup_buckets" in table:
        head["time_to_target_ratio_olmo_vsl_over_rampup_buckets"] = (
            table["olmo_vsl"]["time_to_common_target_s"] / table["rampup_buckets"]["time_to_common_target_s"]
            if table["olmo_vsl"]["time_to_common_target_s"] and table["rampup_buckets"]["time_to_common_target_s"]
            else None
        )
    return {"headline": head, "arms": table, "per_seed": per_seed}


def _step_rate(runs: list[dict[str, Any]], arm: str, seed: int, T: str) -> float:
    r = next(r for r in runs if r["arm"] == arm and r["seed"] == seed)
    return float(r["median_step_tokens_per_s_by_seq_len"][T])


def _both(runs: list[dict[str, Any]], x: str, y: str, seed: int, T: str) -> bool:
    rates = {r["arm"]: r.get("median_step_tokens_per_s_by_seq_len", {}) for r in runs if r["seed"] == seed}
    return T in rates.get(x, {}) and T in rates.get(y, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--tokens", type=int, default=800_000, help="token budget of every arm (capped at OLMo-core's VSL epoch)"
    )
    ap.add_argument("--max-files", type=int, default=200, help="stdlib files in the corpus (sizes OLMo-core's epoch)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--evals", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 65K tokens, 2 evals; no results file")
    ap.add_argument("--profile", action="store_true", help="only profile one step per model")
    ap.add_argument("--arm-worker", help=argparse.SUPPRESS)  # NAME:SEED:CONTEXT_FILE, one arm in this process
    a = ap.parse_args()
    if a.arm_worker:
        torch.set_num_threads(a.threads)
        return arm_worker(a.arm_worker, a)
    if a.profile:
        torch.set_num_threads(a.threads)
        return profile(a.batch_tokens)
    if a.quick:
        a.seeds, a.tokens, a.evals = 1, 65_536, 2
    torch.set_num_threads(a.threads)
    skip = {p: why for p in PEERS if (why := peer_problem(p))}
    for why in skip.values():
        print(f"skipped: {why}")
    arms = [n for n in a.arms.split(",") if not (n.startswith("olmo") and "ai2-olmo-core" in skip)]
    arms = [n for n in arms if not (n.startswith("hf") and "transformers" in skip)]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = prepare(a, Path(tmp), skip)
        print(f"corpus {ctx['corpus_tokens']} tokens, budget {ctx['budget']} tokens per arm; arms: {', '.join(arms)}")
        ctx_file = Path(tmp) / "context.json"
        ctx_file.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in ctx.items()}))
        runs = []
        for seed in range(a.seeds):
            # interleaved: each seed starts at another arm, so a slow spell of the machine lands on other arms
            k = seed * len(arms) // max(a.seeds, 1)
            for name in arms[k:] + arms[:k]:
                print(f"  {name} seed {seed}", flush=True)
                runs.append(run_isolated(name, seed, ctx_file, a))
        ctx_out = {k: v for k, v in ctx.items() if k in ("budget", "corpus_tokens", "olmo_vsl_epoch_tokens")}
    res = summarise(runs)
    result = {
        "benchmark": "peers",
        "machine": machine_info("fp32"),
        "wall_s": round(time.perf_counter() - t_start),
        "setup": {
            "model": HF_CONFIG,
            "L": L,
            "buckets": BUCKETS,
            "batch_tokens": a.batch_tokens,
            "lr": a.lr,
            "seeds": a.seeds,
            **ctx_out,
        },
        "versions": {p: _version(p) for p in PEERS} | {"torch": torch.__version__},
        "skipped": skip,
        **res,
        "runs": runs,
    }
    print(json.dumps(res["headline"], indent=1))
    print(json.dumps(res["arms"], indent=1))
    if not a.quick:
        RESULTS.write_text(json.dumps(result, indent=1))
        print(f"wrote {RESULTS}")


FIXED_ARMS = ("hf_fixed", "rampup_fixed", "olmo_fsl")


def hf_loss(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(input_ids=x[:, :-1], labels=x[:, :-1]).loss


def olmo_loss(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = m(x[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def bare_step_s(arm: str, rows: int, repeats: int = 7) -> float:
    """Median seconds of the arm's model's own training step at (rows, L) with no loop around it: forward,
    backward, clipping and AdamW, in this process just before the arm's run (two warm-up steps first)."""
    torch.manual_seed(0)
    if arm.startswith("olmo"):
        import peers_olmo  # noqa: PLC0415 (imports olmo_core)

        model, loss_of = peers_olmo.model(HF_CONFIG), olmo_loss
    else:
        model, loss_of = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)), hf_loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(1, HF_CONFIG["vocab_size"], (rows, L + 1))
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        loss_of(model, x).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _step_time(model: torch.nn.Module, x: torch.Tensor, loss_of: Any, repeats: int = 7) -> float:
    """Median seconds of forward + backward of ``model`` on ``x`` (after two warm-up steps)."""
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        loss_of(model, x).backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _top_ops(model: torch.nn.Module, x: torch.Tensor, loss_of: Any, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self CPU time in one forward + backward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss_of(model, x).backward()
    model.zero_grad(set_to_none=True)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in rows]


def profile(batch_tokens: int) -> None:
    """One training step (forward + backward, fp32) of the HF Llama (what the Trainer and rampup's engine
    run) against OLMo-core's transformer of the same shape, at every bucket length: median step time and
    where it goes. Writes benchmarks/results/peers_profile.json."""
    import peers_olmo  # noqa: PLC0415 (imports olmo_core)

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    olmo = peers_olmo.model(HF_CONFIG)

    out: dict[str, Any] = {"benchmark": "peers_profile", "machine": machine_info("fp32"), "lengths": {}}
    for T in (64, 256, 1024):
        x = torch.randint(1, HF_CONFIG["vocab_size"], (batch_tokens // T, T + 1))
        row: dict[str, Any] = {"hf_llama_s": _step_time(hf, x, hf_loss), "olmo_s": _step_time(olmo, x, olmo_loss)}
        row["hf_llama_over_olmo_step_time"] = row["hf_llama_s"] / row["olmo_s"]
        print(f"T {T}: HF Llama {row['hf_llama_s'] * 1e3:.0f} ms, OLMo-core {row['olmo_s'] * 1e3:.0f} ms per step")
        if T == 1024:
            row["hf_llama_top_ops"] = _top_ops(hf, x, hf_loss)
            row["olmo_top_ops"] = _top_ops(olmo, x, olmo_loss)
        out["lengths"][str(T)] = row
    path = RESULTS.with_name("peers_profile.json")
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["lengths"]["1024"], indent=1))
    print(f"wrote {path}")


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
