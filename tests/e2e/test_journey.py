"""A user's own Hugging Face model, start to finish, with real processes: a 128-position Llama folder and
its tokenizer, continued on a folder of text with a YaRN stage at 256, scored before and after on the
same windows, stopped by SIGTERM and resumed, exported, loaded with from_pretrained and generated from."""

import json
import os
import signal
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conftest import llama_folder, rampup_cmd, run_rampup, wait_for

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_continue_an_hf_model_past_its_positions_compare_before_and_after_and_ship_it(tmp_path):
    proj = tmp_path / "proj"
    llama_folder(proj / "model")
    (proj / "corpus").mkdir()
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[30:90]:
        (proj / "corpus" / f"{p.stem}.txt").write_text(p.read_text(errors="replace"))
    config = proj / "extend.yaml"
    config.write_text(
        yaml.safe_dump(
            {  # paths relative to the config file, as a user writes them
                "name": "extend",
                "model": {"source": "hf", "path": "model"},
                "data": {"source": "corpus", "cache_dir": str(tmp_path / "cache")},
                "schedule": {
                    "knobs": {"batch_tokens": 1024},
                    "stages": [
                        {"name": "short", "duration": "70%", "seq_len": 128},
                        {
                            "name": "long",
                            "seq_len": 256,
                            "rope": {"method": "yarn", "factor": 2, "original_max_len": 128},
                        },
                    ],
                },
                "optimizer": {"lr": 2e-3, "warmup": "10%"},
                "train": {
                    "duration": "20 steps",
                    "checkpoint_every": "5 steps",
                    "out_dir": str(tmp_path / "run"),
                    "threads": 1,
                    "precision": "fp32",
                },
                "eval": {"seq_lens": [128, 256], "max_tokens": 2048},
                "log": {"progress": "plain"},
            }
        )
    )
    run = tmp_path / "run"

    # before: the base folder scored on the run's held-out windows (the corpus is prepared by it)
    res = run_rampup(
        "eval",
        str(proj / "model"),
        "--data",
        str(config),
        "--lengths",
        "128",
        "256",
        "--passkey-samples",
        "0",
        "--out",
        str(tmp_path / "base.json"),
    )
    assert res.returncode == 0, res.stderr
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["kind"] == "hf_folder" and base["scored"]["max_tokens"] == 2048

    # train past the folder's 128 positions; SIGTERM mid-run, then resume
    proc = subprocess.Popen(
        rampup_cmd("train", str(config)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    wait_for(lambda: (run / "checkpoints" / "step_0000010").is_dir(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped: by signal 15" in err and "error:" not in err, err
    res = run_rampup("train", str(config), "--resume")
    assert res.returncode == 0, res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20

    # after: the run's checkpoint scored the same way; fp32, same windows: its own final eval exactly
    with ThreadPoolExecutor(1) as pool:  # the export (below) runs meanwhile: both only read the finished run
        export = pool.submit(run_rampup, "export", str(run), str(tmp_path / "hf"))
        res = run_rampup("eval", str(run), "--lengths", "128", "256", "--passkey-samples", "0")
        assert res.returncode == 0, res.stderr
        after = json.loads((run / "eval.json").read_text())
        assert after["scored"] == base["scored"]  # the same tokens of the same windows
        assert after["loss"] == summary["val_loss"]
        assert after["loss"]["256"] < base["loss"]["256"]  # continued training at 256 helped at 256
        res = export.result()

    # ship it: the export declares 256 positions and the YaRN scaling, keeps the tokenizer whole
    assert res.returncode == 0, res.stderr
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["max_position_embeddings"] == 256
    rope = conf.get("rope_parameters") or conf.get("rope_scaling")
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2 and rope["original_max_position_embeddings"] == 128
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>") and tok.chat_template
    # the exported model's logits equal the last checkpoint's as rampup runs it (fp32)
    from rampup.config import RunConfig
    from rampup.engine.checkpoint.format import latest_checkpoint, load_checkpoint
    from rampup.models.adapter import Batch
    from rampup.models.build import build_adapter
    from rampup.schedule.registry import KnobContext, KnobRunner
    from rampup.schedule.stages import Schedule

    cfg = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    adapter = build_adapter(cfg.model)
    load_checkpoint(latest_checkpoint(run / "checkpoints"), adapter.module, None)
    KnobRunner(KnobContext(adapter)).apply(
        Schedule.build(cfg.schedule, total=cfg.train.duration).at(0) | {"rope": cfg.schedule.stages[1].knobs["rope"]},
        256,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode(" ".join(["def f(x): return x"] * 40))[:200]])
    adapter.module.eval()
    with torch.no_grad():
        ours = adapter.head(adapter.forward(Batch(ids, ids, {})).hidden)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    out = hf.generate(ids[:, :20], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 25)
    # and the export scores as the run did on its data
    from rampup.tools.longeval import evaluate_run

    shipped = evaluate_run(tmp_path / "hf", data=run, lengths=[256], passkey_samples=0)
    assert shipped["loss"]["256"] == pytest.approx(after["loss"]["256"], rel=1e-4)
