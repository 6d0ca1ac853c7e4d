"""Preparing corpora: text folders, JSONL and Parquet into token shards, cached by settings."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pydantic
import pytest

from conftest import run_rampup
from rampup.data import (
    EOT,
    DataConfig,
    TokenDataset,
    TokenizerConfig,
    load_prepared_tokenizer,
    prepare,
    read_meta,
    resolve_source,
    stdlib_files,
)
from rampup.data.prepare import describe_prepared
from rampup.errors import DataError

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def class return "
    "import for while if else print(x) = + - * ( ) : , . ü € 日本"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 8))]
        texts.append(f"doc {i}\n" + "\n".join(lines) + "\n")
    return texts


def cfg_for(source: Path | str, cache: Path, **kw) -> DataConfig:
    path = kw.pop("tokenizer_path", None)
    tok = TokenizerConfig(vocab_size=kw.pop("vocab_size", 300), path=path and str(path))
    return DataConfig(source=str(source), cache_dir=str(cache), tokenizer=tok, **kw)


def decoded_docs(folder: Path, split: str) -> list[str]:
    """Each document's text, decoded from its tokens (the trailing EOT dropped)."""
    ds = TokenDataset.open(folder, split)
    tok = load_prepared_tokenizer(folder)
    out = []
    for i in range(ds.n_docs):
        ids = ds.doc(i)
        assert ids[-1] == ds.eot_id
        assert ds.eot_id not in ids[:-1]
        out.append(tok.decode(ids[:-1].tolist()))
    return out


@pytest.fixture
def text_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    texts = make_texts(30)
    for i, text in enumerate(texts):
        ext = (".txt", ".md", ".py")[i % 3]
        (root / ("sub" if i % 2 else "") / f"f{i:02d}{ext}").write_text(text, encoding="utf-8")
    (root / "empty.txt").write_text("  \n")
    (root / ".hidden.txt").write_text("never read")
    (root / ".git" / "HEAD").write_text("never read either")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    return root, texts


def test_stdlib_files_are_the_standard_library_without_tests() -> None:
    files = stdlib_files()
    assert len(files) > 200
    assert all(f.is_file() and f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages", "idlelib"} & set(f.parts) for f in files)
    assert files == stdlib_files()
    assert sum(f.stat().st_size for f in files) < 20e6  # the default corpus stays quick to prepare


def test_text_folder_round_trips(text_folder, tmp_path: Path) -> None:
    root, texts = text_folder
    folder = prepare(cfg_for(root, tmp_path / "cache", val_fraction=0.2))
    meta = read_meta(folder)
    assert meta["dtype"] == "uint16"
    assert meta["n_empty_docs"] == 1 and meta["n_binary_files"] == 1
    assert meta["splits"]["train"]["n_docs"] + meta["splits"]["val"]["n_docs"] == len(texts)
    docs = decoded_docs(folder, "train") + decoded_docs(folder, "val")
    assert sorted(docs) == sorted(texts)


def test_index_and_shards_are_consistent(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    # A small shard size forces several shards; documents never straddle two.
    folder = prepare(cfg_for(root, tmp_path / "cache", shard_tokens=200, val_fraction=0.2))
    meta = read_meta(folder)
    for split in ("train", "val"):
        index = np.load(folder / f"{split}_docs.npy")
        info = meta["splits"][split]
        assert index.dtype == np.int64 and index.shape == (info["n_docs"], 3)
        assert index[:, 2].sum() == info["n_tokens"]
        assert info["n_shards"] > 1 if split == "train" else info["n_shards"] >= 1
        for s in range(info["n_shards"]):
            raw = np.fromfile(folder / f"{split}_{s:04d}.bin", dtype=np.uint16)
            rows = index[index[:, 0] == s]
            # Documents sit back to back and exactly fill their shard.
            assert rows[0, 1] == 0
            assert (rows[1:, 1] == rows[:-1, 1] + rows[:-1, 2]).all()
            assert rows[-1, 1] + rows[-1, 2] == len(raw)
            assert (raw[rows[:, 1] + rows[:, 2] - 1] == meta["eot_id"]).all()
    assert decoded_docs(folder, "train")  # still decodes across shards


def test_jsonl(tmp_path: Path) -> None:
    texts = make_texts(12)
    lines = [json.dumps({"content": t, "id": i}) for i, t in enumerate(texts)]
    lines.insert(3, "")  # blank lines are not documents
    lines.append(json.dumps({"content": ""}))  # an empty document is counted, not kept
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    folder = prepare(cfg_for(tmp_path / "data.jsonl", tmp_path / "cache", text_field="content"))
    assert read_meta(folder)["n_empty_docs"] == 1
    assert sorted(decoded_docs(folder, "train") + decoded_docs(folder, "val")) == sorted(texts)


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = make_texts(15)
    pq.write_table(pa.table({"text": texts + [None]}), tmp_path / "part.parquet", row_group_size=4)
    folder = prepare(cfg_for(tmp_path / "part.parquet", tmp_path / "cache"))
    assert read_meta(folder)["n_empty_docs"] == 1
    assert sorted(decoded_docs(folder, "train") + decoded_docs(folder, "val")) == sorted(texts)


def test_parquet_missing_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: body\)"):
        prepare(cfg_for(tmp_path / "p.parquet", tmp_path / "cache"))


def test_end_of_text_inside_a_document_is_plain_text(tmp_path: Path) -> None:
    texts = [f"before {EOT} after", "another document", "and a third"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    folder = prepare(cfg_for(tmp_path, tmp_path / ".cache"))
    assert sorted(decoded_docs(folder, "train") + decoded_docs(folder, "val")) == sorted(texts)


def test_val_split_is_deterministic_disjoint_and_stable(text_folder, tmp_path: Path) -> None:
    root, texts = text_folder
    a = prepare(cfg_for(root, tmp_path / "cache_a", val_fraction=0.3))
    b = prepare(cfg_for(root, tmp_path / "cache_b", val_fraction=0.3))
    val_a, val_b = decoded_docs(a, "val"), decoded_docs(b, "val")
    train = decoded_docs(a, "train")
    assert val_a == val_b and 0 < len(val_a) < len(texts)
    assert not set(val_a) & set(train)
    # The same documents stay held out when the corpus grows.
    for i, text in enumerate(make_texts(10, seed=1)):
        (root / f"new{i}.txt").write_text(text)
    grown = prepare(cfg_for(root, tmp_path / "cache_a", val_fraction=0.3))
    assert grown != a
    assert set(val_a) <= set(decoded_docs(grown, "val"))


def test_each_split_gets_a_document(tmp_path: Path) -> None:
    for i, t in enumerate(make_texts(2)):
        (tmp_path / f"{i}.txt").write_text(t)
    folder = prepare(cfg_for(tmp_path, tmp_path / ".cache", val_fraction=0.01))
    meta = read_meta(folder)
    assert meta["splits"]["train"]["n_docs"] == 1 and meta["splits"]["val"]["n_docs"] == 1


def test_cache_is_reused_and_keyed_by_settings(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    cache = tmp_path / "cache"
    first = prepare(cfg_for(root, cache))
    stamp = (first / "meta.json").stat().st_mtime_ns, (first / "train_0000.bin").stat().st_mtime_ns
    again = prepare(cfg_for(root, cache))
    assert again == first
    assert ((first / "meta.json").stat().st_mtime_ns, (first / "train_0000.bin").stat().st_mtime_ns) == stamp
    changed = {
        prepare(cfg_for(root, cache, vocab_size=320)),
        prepare(cfg_for(root, cache, val_fraction=0.1)),
        prepare(cfg_for(root, cache, max_files=5)),
    }
    assert first not in changed and len(changed) == 3
    (root / "f00.txt").write_text("edited\n")
    assert prepare(cfg_for(root, cache)) != first
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_incomplete_folder_is_prepared_again(text_folder, tmp_path: Path) -> None:
    root, texts = text_folder
    cfg = cfg_for(root, tmp_path / "cache", val_fraction=0.2)
    folder = prepare(cfg)
    (folder / "meta.json").unlink()  # as if a prepare had died before its last write
    (folder / "train_0000.bin").write_bytes(b"junk")
    assert prepare(cfg) == folder
    assert sorted(decoded_docs(folder, "train") + decoded_docs(folder, "val")) == sorted(texts)


def test_a_concurrent_prepare_that_finishes_first_keeps_its_folder(text_folder, tmp_path: Path, monkeypatch) -> None:
    """Two prepares of one corpus at once (a run and its reference started together): the one that ends
    second uses the complete folder of the first, which that process may be reading, and never replaces it."""
    import importlib
    import subprocess
    import sys

    prepare_module = importlib.import_module("rampup.data.prepare")  # the module (rampup.data.prepare is the function)

    root, texts = text_folder
    cfg = cfg_for(root, tmp_path / "cache", val_fraction=0.2)
    build, seen = prepare_module._build, {}

    def build_while_another_finishes(*args):
        build(*args)  # this prepare's folder, under its temporary name; meanwhile another process's ends:
        code = "import sys; from rampup.data import DataConfig as C, prepare; "
        code += "print(prepare(C.model_validate_json(sys.argv[1])))"
        other = subprocess.run([sys.executable, "-c", code, cfg.model_dump_json()], capture_output=True, text=True)
        assert other.returncode == 0, other.stderr
        seen["folder"] = Path(other.stdout.strip())
        seen["inode"] = seen["folder"].stat().st_ino

    monkeypatch.setattr(prepare_module, "_build", build_while_another_finishes)
    folder = prepare(cfg)
    assert folder == seen["folder"] and folder.stat().st_ino == seen["inode"]  # the other's folder, untouched
    assert sorted(decoded_docs(folder, "train") + decoded_docs(folder, "val")) == sorted(texts)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # this one's copy removed


def test_loaded_tokenizer_gives_the_same_tokens(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    trained = prepare(cfg_for(root, tmp_path / "a"))
    loaded = prepare(cfg_for(root, tmp_path / "b", tokenizer_path=trained / "tokenizer.json"))
    for split in ("train", "val"):
        assert (
            np.fromfile(trained / f"{split}_0000.bin", np.uint16)
            == np.fromfile(loaded / f"{split}_0000.bin", np.uint16)
        ).all()


def test_bad_tokenizer_files(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    with pytest.raises(DataError, match="nope.json' does not exist"):
        prepare(cfg_for(root, tmp_path / "c", tokenizer_path=tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        prepare(cfg_for(root, tmp_path / "c", tokenizer_path=tmp_path / "bad.json"))


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'.*missing' does not exist.*data\.source.*stdlib"):
        resolve_source(str(tmp_path / "missing"))


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match="no files"):
        prepare(cfg_for(tmp_path / "corpus", tmp_path / "cache"))
    (tmp_path / "corpus" / "a.txt").write_text("")
    (tmp_path / "corpus" / "b.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"no documents in .*corpus.*2 empty"):
        prepare(cfg_for(tmp_path / "corpus", tmp_path / "cache"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"body": "x"}', r"bad\.jsonl:2: no 'text' field.*data\.text_field"),
        ('{"text": 3}', r"bad\.jsonl:2: field 'text' is int"),
    ],
)
def test_bad_jsonl_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        prepare(cfg_for(tmp_path / "bad.jsonl", tmp_path / "cache"))


def test_open_needs_a_prepared_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `rampup prepare`"):
        TokenDataset.open(tmp_path, "train")


def test_index_past_shard_end_is_reported(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    folder = prepare(cfg_for(root, tmp_path / "cache"))
    with pytest.raises(DataError, match="did you mean 'train'"):
        TokenDataset.open(folder, "trian")
    index = np.load(folder / "train_docs.npy")
    index[-1, 2] += 5
    np.save(folder / "train_docs.npy", index)
    with pytest.raises(
        DataError,
        match=r"train_docs\.npy, row \d+: .*offset \d+ past the end of "
        r".*train_0000\.bin",
    ):
        TokenDataset.open(folder, "train")


def _shard_bytes(folder: Path, update) -> None:
    """Rewrite train_0000.bin through ``update(bytearray)``."""
    path = folder / "train_0000.bin"
    blob = bytearray(path.read_bytes())
    update(blob)
    path.write_bytes(bytes(blob))


def test_flipped_shard_byte_fails_its_checksum(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    folder = prepare(cfg_for(root, tmp_path / "cache"))
    info = read_meta(folder)["splits"]["train"]
    assert [len(s["sha256"]) for s in info["shards"]] == [64] and len(info["index_sha256"]) == 64

    def flip(blob):  # the low bit of the first token: still a valid id, the index checks still pass
        blob[0] ^= 0x01

    _shard_bytes(folder, flip)
    with pytest.raises(DataError, match=r"shard .*train_0000\.bin does not match its sha256 .*verify_checksums"):
        TokenDataset.open(folder, "train")
    assert TokenDataset.open(folder, "train", verify=False).n_docs == info["n_docs"]  # the check is optional
    TokenDataset.open(folder, "val")  # the other split is intact


def test_truncated_shard_is_named_with_its_offset(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    folder = prepare(cfg_for(root, tmp_path / "cache"))
    size = (folder / "train_0000.bin").stat().st_size
    with open(folder / "train_0000.bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(
        DataError,
        match=rf"train_0000\.bin has {size - 10} bytes, meta.json says {size} .*"
        rf"cut short at byte offset {size - 10}",
    ):
        TokenDataset.open(folder, "train", verify=False)  # a size check: always on


def test_token_outside_the_vocabulary_is_named_with_file_and_offset(text_folder, tmp_path: Path) -> None:
    """A shard written by another tokenizer: its checksum matches meta.json, its ids do not fit."""
    root, _ = text_folder
    folder = prepare(cfg_for(root, tmp_path / "cache"))
    meta = read_meta(folder)
    tokens = np.fromfile(folder / "train_0000.bin", dtype=np.uint16)
    tokens[17] = meta["vocab_size"] + 5
    tokens.tofile(folder / "train_0000.bin")
    meta["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataError,
        match=rf"train_0000\.bin: token id {meta['vocab_size'] + 5} at token offset 17 "
        rf"\(byte 34\) is outside the vocabulary of {meta['vocab_size']}",
    ):
        TokenDataset.open(folder, "train")


def test_changed_index_fails_its_checksum(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    folder = prepare(cfg_for(root, tmp_path / "cache"))
    index = np.load(folder / "train_docs.npy")
    index[[0, 1]] = index[[1, 0]]  # two rows swapped: every row is still valid on its own
    np.save(folder / "train_docs.npy", index)
    with pytest.raises(DataError, match=r"train_docs\.npy does not match its sha256"):
        TokenDataset.open(folder, "train")


def test_a_pickled_index_is_refused_not_loaded(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    folder = prepare(cfg_for(root, tmp_path / "cache"))
    np.save(folder / "train_docs.npy", np.array([{"shard": 0}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"train_docs\.npy is missing or unreadable .*pickle"):
        TokenDataset.open(folder, "train")


def _undecodable_corpus(root: Path) -> None:
    root.mkdir()
    for i, text in enumerate(make_texts(6)):
        (root / f"ok{i}.txt").write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))  # é as the lone byte 0xE9
    (root / "docs.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "   "}\n')


@pytest.mark.parametrize("mode", ["skip", "error", "replace"])
def test_undecodable_inputs_are_skipped_counted_or_refused(tmp_path: Path, mode: str) -> None:
    _undecodable_corpus(tmp_path / "corpus")
    cfg = cfg_for(tmp_path / "corpus", tmp_path / "cache", on_undecodable=mode)
    if mode == "error":
        with pytest.raises(DataError, match=r"docs\.jsonl:2: not valid UTF-8 at byte offset 31 .*on_undecodable"):
            prepare(cfg)
        return
    meta = read_meta(prepare(cfg))
    n_docs = meta["splits"]["train"]["n_docs"] + meta["splits"]["val"]["n_docs"]
    assert meta["n_empty_docs"] == 1
    if mode == "skip":
        assert n_docs == 7 and meta["n_undecodable"] == 2
        assert meta["undecodable"] == [
            f"{tmp_path / 'corpus' / 'docs.jsonl'}:2 (byte 31)",
            f"{tmp_path / 'corpus' / 'latin1.txt'} (byte 3)",
        ]
        assert any("2 undecodable inputs" in line for line in describe_prepared(meta))
    else:
        assert n_docs == 9 and meta["n_undecodable"] == 0


def test_prepare_command_reports_what_it_left_out(tmp_path: Path) -> None:
    _undecodable_corpus(tmp_path / "corpus")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": {"vocab_size": 300},
                "data": {
                    "source": str(tmp_path / "corpus"),
                    "cache_dir": str(tmp_path / "cache"),
                    "buckets": {"min_log2": 2, "max_log2": 4},
                },
                "schedule": {"stages": [{"seq_len": 16}]},
            }
        )
    )
    res = run_rampup("prepare", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "skipped: 1 empty documents, 0 binary files, 2 undecodable inputs" in res.stdout
    assert "latin1.txt (byte 3)" in res.stdout


def test_read_stream_concatenates_documents(text_folder, tmp_path: Path) -> None:
    root, _ = text_folder
    ds = TokenDataset.open(prepare(cfg_for(root, tmp_path / "cache")), "train")
    order = np.array([3, 0, 2])
    stream = np.concatenate([ds.doc(i) for i in order])
    got, pos, off = ds.read_stream(order, 0, 2, 10)
    assert (got == stream[2:12]).all()
    rest, pos, off = ds.read_stream(order, pos, off, 10**6)
    assert (rest == stream[12:]).all() and (pos, off) == (3, 0)


def test_config_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="val_fraction"):
        DataConfig(val_fraction=0.5)
    with pytest.raises(pydantic.ValidationError, match="vocab_size"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(pydantic.ValidationError, match="sourc"):
        DataConfig(sourc="x")
    for name, field in {**DataConfig.model_fields, **TokenizerConfig.model_fields}.items():
        assert field.description, f"{name} has no docstring"


def test_hf_datasets_folder_is_read_as_its_arrow_files(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    texts = make_texts(30)
    ds = Dataset.from_dict({"body": texts, "n": list(range(30))})
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)  # three Arrow stream files
    folder = prepare(cfg_for(tmp_path / "one", tmp_path / "cache", text_field="body"))
    meta = read_meta(folder)
    assert sorted(decoded_docs(folder, "train") + decoded_docs(folder, "val")) == sorted(texts)
    assert meta["n_files"] == 3 and meta["bytes_skipped"] == 0  # the JSON metadata is not read as text
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, n\); set data.text_field"):
        prepare(cfg_for(tmp_path / "one", tmp_path / "cache"))
    with pytest.raises(DataError, match=r"data.split 'train' picks a split of a Hugging Face DatasetDict.*remove"):
        prepare(cfg_for(tmp_path / "one", tmp_path / "cache", text_field="body", split="train"))

    other = make_texts(8, seed=3)
    DatasetDict({"train": Dataset.from_dict({"text": texts}), "test": Dataset.from_dict({"text": other})}).save_to_disk(
        str(tmp_path / "dict")
    )
    with pytest.raises(DataError, match=r"DatasetDict with splits train, test; set data.split"):
        prepare(cfg_for(tmp_path / "dict", tmp_path / "cache"))
    with pytest.raises(DataError, match=r"data.split 'validation' is not a split of .*its splits: train, test"):
        prepare(cfg_for(tmp_path / "dict", tmp_path / "cache", split="validation"))
    test_split = prepare(cfg_for(tmp_path / "dict", tmp_path / "cache", split="test"))
    assert sorted(decoded_docs(test_split, "train") + decoded_docs(test_split, "val")) == sorted(other)
    # a datasets folder inside a walked folder: its Arrow files, not its metadata
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("a plain text document")
    ds.rename_column("body", "text").save_to_disk(str(tmp_path / "mixed" / "saved"))
    files = resolve_source(str(tmp_path / "mixed"))
    assert [f.name for f in files] == ["notes.txt", "data-00000-of-00001.arrow"]


def test_mostly_unreadable_folder_names_what_it_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_text("the only text in here\n")
    (src / "weights.bin").write_bytes(b"\0\1" * 50_000)
    (src / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0" + bytes(range(256)) * 40)
    meta = read_meta(prepare(cfg_for(src, tmp_path / "cache")))
    lines = " ".join(describe_prepared(meta))
    assert re.search(r"only 0\.\d% of the .* is readable text: skipped weights\.bin \(97\.7 KiB\), logo\.png", lines), (
        lines
    )
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("only text here " * 100)
    assert "readable text" not in " ".join(describe_prepared(read_meta(prepare(cfg_for(text, tmp_path / "cache")))))


def test_plan_warns_when_the_budget_repeats_a_small_corpus(tmp_path: Path, capsys) -> None:
    from conftest import tiny_tree, write_config
    from rampup.cli import main

    src = tmp_path / "docs"
    src.mkdir()
    for i, t in enumerate(make_texts(20)):
        (src / f"{i}.txt").write_text(t)
    small = write_config(
        tmp_path / "small.yaml",
        tiny_tree(tmp_path / "cache", tmp_path / "out", data={"source": str(src), "max_files": None}),
    )
    assert main(["plan", str(small), "--no-time", "--png", str(tmp_path / "p.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"warning: the run's 81,920 tokens are over \d+ epochs of .*docs \(at most [\d,]+ tokens", out), (
        out
    )
    assert main(["prepare", str(small)]) == 0
    capsys.readouterr()
    assert main(["plan", str(small), "--no-time", "--png", str(tmp_path / "p.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"warning: the run's 81,920 tokens are \d+ epochs of this corpus's [\d,]+ training tokens", out)
    # the same budget on the default corpus: no warning
    big = write_config(tmp_path / "big.yaml", tiny_tree(tmp_path / "cache", tmp_path / "out"))
    assert main(["plan", str(big), "--no-time", "--png", str(tmp_path / "p.png")]) == 0
    assert "warning" not in capsys.readouterr().out
