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
