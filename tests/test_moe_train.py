"""MoE end to end through the CLI: per-layer metrics in metrics.jsonl and the log line, and load
balancing (Switch loss, aux-loss-free bias) flattening the expert load of a short run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import MESHES
from picotron_jax.cli import main

SHORT = ["train.steps=8", "train.seq_len=32", "logging.every=1", "optimizer.warmup_steps=1", "optimizer.lr=1e-3",
         "moe.aux_loss=0", "moe.router_z_loss=0"]


def train_rows(tmp_path, name: str, *overrides: str) -> list[dict]:
    run_dir = tmp_path / name
    assert main(["train", "--config", str(MESHES / "moe-single.yaml"), "--run-dir", str(run_dir), *SHORT,
                 *overrides]) == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def imbalance(rows: list[dict]) -> float:
    """max/mean tokens per expert, averaged over the MoE layers and the last 3 steps (1.0 = balanced)."""
    return float(np.mean([r["moe_load_max_over_mean"] for r in rows[-3:]]))


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    return train_rows(tmp_path_factory.mktemp("moe"), "off")


def test_per_layer_metrics_are_logged(unbalanced, capsys):
    row = unbalanced[-1]
    tokens_per_step = 16 * 32 * 2  # batch x seq x top-2 copies
    for layer in range(4):
        lo, hi, mean = (row[f"moe_l{layer}_tokens_{s}"] for s in ("min", "max", "mean"))
        assert 0 <= lo <= mean <= hi and mean * 8 == tokens_per_step
        assert 0 <= row[f"moe_l{layer}_dropped"] < 1 and row[f"moe_l{layer}_aux"] >= 1.0 - 1e-6
        assert row[f"moe_l{layer}_z"] > 0
    assert row["moe_dropped"] > 0, "capacity 1.25 on a collapsed router must drop tokens"


@pytest.mark.parametrize("balancing", [
    ["moe.aux_loss=0.1"],
    pytest.param(["moe.bias_update_rate=0.02"], marks=pytest.mark.slow),
])
def test_balancing_lowers_the_max_over_mean_load(unbalanced, tmp_path, balancing):
    balanced = train_rows(tmp_path, "on", *balancing)
    assert imbalance(balanced) < imbalance(unbalanced) - 0.2, (imbalance(balanced), imbalance(unbalanced))


@pytest.mark.slow
def test_resume_with_router_bias_gives_the_same_losses(tmp_path):
    """The aux-loss-free bias lives in the parameters, so a checkpoint carries it across a restart."""
    common = ["--config", str(MESHES / "moe-ep8.yaml"), "train.seq_len=32", "logging.every=1",
              "optimizer.warmup_steps=1", "optimizer.decay_steps=3", "checkpoint.every=2",
              "moe.bias_update_rate=0.01"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--run-dir", str(straight), "train.steps=4", *common]) == 0
    assert main(["train", "--run-dir", str(split), "train.steps=2", *common]) == 0
    assert main(["train", "--run-dir", str(split), "--resume", "train.steps=4", *common]) == 0
    rows = {r["step"]: r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())}
    resumed = {r["step"]: r for r in map(json.loads, (split / "metrics.jsonl").read_text().splitlines())}
    for step in (3, 4):
        assert resumed[step]["loss"] == rows[step]["loss"]
        assert resumed[step]["moe_l0_tokens_max"] == rows[step]["moe_l0_tokens_max"]


@pytest.mark.slow
def test_bfloat16_compute_trains(tmp_path):
    rows = train_rows(tmp_path, "bf16", "train.dtype=bfloat16", "train.steps=3", "moe.dispatch=dropless",
                      "moe.shared_experts=1")
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["moe_dropped"] == 0.0
