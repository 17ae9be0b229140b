"""End to end: the CLI trains on the embedded corpus, writes its run directory, and benchmarks.

Resume and checkpoint tests live in test_checkpoint*.py."""

from __future__ import annotations

import json

import yaml

from helpers import MESHES
from picotron_jax.cli import main

SHORT = ["train.steps=40", "train.seq_len=64", "logging.every=10", "optimizer.warmup_steps=5"]


def test_loss_falls_on_the_default_corpus(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(MESHES / "default.yaml"), "--run-dir", str(run_dir), *SHORT])
    out = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40]
    assert [r["step"] for r in evals] == [40] and evals[0]["eval_loss"] < rows[0]["loss"]  # default.yaml holds out
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert key in rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5, [r["loss"] for r in rows]
    assert 0 < rows[-1]["mfu"] < 1 and rows[-1]["tokens_per_s"] > 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 40 and saved["mesh"]["tensor"] == 2 and saved["train"]["zero_stage"] == 3
    assert "step 40/40 | loss" in out and "done" in out and "tok/s" in out
    assert "eval step 40/40 | loss" in out and "sample (temperature 0.8, 48 tokens) | 'def main():\\n    ' -> " in out


def test_bench_writes_the_promised_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    code = main(["bench", "--config", str(MESHES / "tp2-dp4.yaml"), "--json", str(out_file),
                 "train.seq_len=32", "bench.steps=2", "bench.warmup=1"])
    assert code == 0
    result = json.loads(out_file.read_text())
    assert result == json.loads(capsys.readouterr().out)
    for key in ("tokens_per_s", "mfu", "peak_flops", "step_s", "compile_s"):
        assert result[key] > 0, key
    assert 0 < result["mfu"] < 1
    assert {"argument_bytes", "output_bytes", "temp_bytes"} <= set(result["memory"])
    # data parallel over 4 devices: the gradients are all-reduced every step
    assert result["collective_bytes"]["all-reduce"] > 0
