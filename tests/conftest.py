import contextlib
import copy
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from rampup.models.adapter import DecoderLMAdapter
from rampup.models.llm import DecoderLM, ModelConfig

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session (tokenizing is the slow part of a tiny run)."""
    return tmp_path_factory.mktemp("rampup_cache")


def tiny_tree(cache: Path, out_dir: Path, **sections) -> dict:
    """A tiny run: ~100K-parameter model, 40 stdlib files, two stages (64 then 256 tokens)."""
    tree = {
        "name": "tiny",
        "model": {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
        "data": {"source": "stdlib", "max_files": 40, "cache_dir": str(cache)},
        "schedule": {
            "knobs": {"batch_tokens": 2048},
            "stages": [{"name": "short", "duration": "50%", "seq_len": 64}, {"name": "long", "seq_len": 256}],
        },
        "optimizer": {"lr": 3e-3, "warmup": "5%"},
        "train": {"duration": "40 steps", "checkpoint_every": "10 steps", "out_dir": str(out_dir), "threads": 1},
        "eval": {"seq_lens": [64, 256], "max_tokens": 2048},
        "log": {"progress": "plain"},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values} if isinstance(values, dict) else values
    return tree


def text_corpus(folder: Path, alphabet: str, n_docs: int, seed: int) -> Path:
    """A folder of real text files whose words use only ``alphabet`` (two such corpora share no token but EOT)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(30, 400))]
        (folder / f"doc{d:03d}.txt").write_text(" ".join(words))
    return folder


@pytest.fixture(scope="session")
def two_corpora(tmp_path_factory) -> dict[str, Path]:
    """Two corpora for data mixtures (letters, digits) and a cache for them."""
    root = tmp_path_factory.mktemp("mix")
    return {
        "letters": text_corpus(root / "letters", "abcdefghij", 60, 1),
        "digits": text_corpus(root / "digits", "0123456789", 40, 2),
        "cache": root / "cache",
    }


def mix_tree(corpora: dict[str, Path], out: Path, sources: dict | None = None, **sections) -> dict:
    """The tiny run over a mixture of the two corpora (a 300-token tokenizer trained on both)."""
    tree = tiny_tree(corpora["cache"], out, **sections)
    tree["model"]["vocab_size"] = 300
    tree["data"] = {
        "cache_dir": str(corpora["cache"]),
        "val_fraction": 0.1,
        "sources": sources
        or {"letters": {"source": str(corpora["letters"])}, "digits": {"source": str(corpora["digits"])}},
    }
    return tree


def png_folder(root: Path, classes=3, per_class=12, size=40, seed=0) -> Path:
    """A folder of real PNGs, one subfolder per class: a coloured square (class k: colour k) at a random
    place on grey noise, not square (centre-cropped when prepared); crops and flips keep the class."""
    from PIL import Image

    colours = [(255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 40), (40, 255, 255), (255, 40, 255)]
    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"class_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.repeat(rng.integers(60, 120, size=(size, size + 6, 1), dtype=np.uint8), 3, axis=2)
            top, left = rng.integers(0, size - 16, size=2)
            a[top : top + 16, left : left + 16] = colours[k]
            Image.fromarray(a).save(d / f"img{i:03d}.png")
    return root


def flip_bit(path: Path, offset: int) -> None:
    """Damage a file in place: flip the lowest bit of the byte at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def rampup_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rampup.cli", *args]


def run_rampup(
    *args: str, timeout: float = 300, env_extra: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", **(env_extra or {})}
    return subprocess.run(rampup_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, **kw)


@contextlib.contextmanager
def alongside(*args: str, timeout: float = 600):
    """``rampup ARGS`` in a background process while the block runs, asserted successful at its end.

    The suite's runs are single-threaded: an uninterrupted reference trains on the second core while
    the test kills and resumes its twin (the results are bitwise the same either way)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            rampup_cmd(*args),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        try:
            yield proc
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        assert proc.returncode == 0, log.read()[-3000:]


def step_losses(out: Path) -> dict[int, float]:
    from rampup.engine.records import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"}


def weights(out: Path) -> bytes:
    """The latest checkpoint's weights as bytes, in name order (either checkpoint format)."""
    from rampup.engine.checkpoint.format import latest_checkpoint, model_tensors

    tensors = model_tensors(latest_checkpoint(out / "checkpoints"))
    return b"".join(
        k.encode() + tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k in sorted(tensors)
    )


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.05) -> None:
    """Poll ``pred`` until true; fail if ``proc`` exits first or time runs out."""
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"exited with {proc.returncode} while waiting"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(poll)


@pytest.fixture(scope="session")
def uninterrupted(data_cache, tmp_path_factory) -> Path:
    """The tiny run trained once without interruption: the reference every resumed run must equal.
    It profiles every 8th step (the resumed runs do not: profiling must not change a number)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_config(out / "run.yaml", tiny_tree(data_cache, out / "run", train={"profile_every": 8}))
    res = run_rampup("train", str(cfg))
    assert res.returncode == 0, res.stderr
    return out / "run"


# ----------------------------------------------------------------------------- runs killed around a stage transition


def kill_after_checkpoints(cfg, out, steps):
    """For each step: `rampup train` (resuming when there is a checkpoint) stalled in the next step and
    SIGKILLed once the step's checkpoint exists; the next process resumes from it."""
    import subprocess

    for ckpt in steps:
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        env = {**os.environ, "PYTHONHASHSEED": "0", "RAMPUP_FAULT_STALL_STEPS": f"{ckpt + 1}:60"}
        proc = subprocess.Popen(
            rampup_cmd("train", str(cfg), *resume), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        wait_for(lambda ckpt=ckpt: (out / "checkpoints" / f"step_{ckpt:07d}").is_dir(), proc)
        proc.kill()
        proc.wait()


N, B = 20, 10  # steps of the runs killed here, and the last step of their first stage (the transition is B + 1)


def short_tree(data_cache, out, **sections):
    """tiny_tree cut to N steps, checkpointed every step and keeping one (what a kill must survive)."""
    train = {"duration": f"{N} steps", "checkpoint_every": "1 step", "keep_checkpoints": 1, **sections.pop("train", {})}
    return tiny_tree(data_cache, out, train=train, **sections)


def kill_steps(seed, *also, n=1):
    """Checkpoints to SIGKILL after: the transition's first step, those given, and n at seeded random steps."""
    rng = random.Random(seed)
    return sorted({B + 1, *also, *rng.sample(range(2, N), n)})


@pytest.fixture(scope="session")
def plain(data_cache, tmp_path_factory):
    """The N-step run without any transition, uninterrupted."""
    out = tmp_path_factory.mktemp("plain")
    tree = short_tree(data_cache, out / "run", train={"checkpoint_every": None})
    assert run_rampup("train", str(write_config(out / "plain.yaml", tree))).returncode == 0
    return step_losses(out / "run")


@pytest.fixture(scope="module")
def tied():
    torch.manual_seed(0)
    return DecoderLMAdapter.build(ModelConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, max_seq_len=128))


BUCKETS = {
    "data": {"sampler": "buckets", "buckets": {"min_log2": 5, "max_log2": 8, "cycles": 3}},
    "schedule": {
        "knobs": {"batch_tokens": 2048, "seq_len": 256},
        "stages": [
            {"name": "grow", "duration": "60%", "bucket_odds": "grow-p2"},
            {"name": "even", "bucket_odds": "uniform"},
        ],
    },
}


def bucket_tree(cache, out, **more):
    tree = tiny_tree(cache, out, schedule=copy.deepcopy(BUCKETS["schedule"]))
    tree["data"] = {**tree["data"], **copy.deepcopy(BUCKETS["data"])}
    for k, v in more.items():
        tree[k] = {**tree.get(k, {}), **v}
    return tree


def to_hf_state(m: DecoderLM) -> dict[str, torch.Tensor]:
    """Our parameter names -> LlamaForCausalLM's. Same layouts, so no permutation is needed."""
    sd = {
        "model.embed_tokens.weight": m.tok_emb.weight,
        "model.norm.weight": m.norm.weight,
        "lm_head.weight": m.lm_head.weight,
    }
    for i, b in enumerate(m.layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": b.attn_norm.weight,
            p + "post_attention_layernorm.weight": b.mlp_norm.weight,
            p + "mlp.gate_proj.weight": b.mlp.w1.weight,
            p + "mlp.up_proj.weight": b.mlp.w3.weight,
            p + "mlp.down_proj.weight": b.mlp.w2.weight,
        }
        for n in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{n}_proj.weight"] = getattr(b.attn, f"{n}_proj").weight
    return sd


def bpe_tokenizer(special_tokens: list[str]) -> Any:
    """A real byte-level BPE tokenizer of 600 tokens, trained on 30 of the standard library's own files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def llama_folder(folder: Path) -> None:
    """A tiny Llama of 128 positions and a real BPE tokenizer (bos, eos, pad and a chat template)."""
    import transformers

    tok = bpe_tokenizer(["<s>", "</s>", "<pad>"])
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=128
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    fast.save_pretrained(folder)
