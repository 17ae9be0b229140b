"""MoE layers in pipeline stages: each stage holds whole [MoE, dense] groups, its MoE layers send their tokens
to the expert ranks with all_to_all inside the stage, and the balancing losses, router z-loss, per-expert
loads and drops come out of the schedule summed over microbatches and stages as on one device.

Each case against the single-device run of the same tiny model (4 layers, [MoE, dense] x 2, 8 experts top-2,
width 32, seq 16) with train.grad_accum = pipeline.microbatches (the losses are means per microbatch):
the loss and every MoE metric within rtol 1e-5, the gradients within the suite's tolerance.
The 5D preset (pipe x data x context x expert x tensor on 32 devices) runs in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import preset, setup, synthetic_batch
from test_layouts import assert_grads_close
from picotron_jax.train.state import init_params
from picotron_jax.train.step import build_grad_fn

REPO = Path(__file__).resolve().parent.parent
TINY = ("model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4", "model.num_kv_heads=2",
        "moe.expert_size=32", "train.seq_len=16", "train.global_batch=8",
        "moe.aux_loss=0.1", "moe.router_z_loss=0.01")  # balancing terms large enough to move the gradients
PP2_EP4 = ("mesh.pipe=2", "mesh.expert=4", "mesh.data=1", "mesh.num_devices=8", "pipeline.microbatches=2")


def metrics_and_grads(name, *overrides):
    cfg = preset(name, *TINY, *overrides)
    rules, st = setup(cfg)
    metrics, grads = build_grad_fn(cfg, rules, st)(init_params(cfg, st), synthetic_batch(cfg, 0, rules))
    return jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, grads)


def assert_matches_one_device(metrics, grads, ref_metrics, ref_grads, skip=()):
    assert any(k.startswith("moe_") for k in ref_metrics)
    assert set(metrics) == set(ref_metrics)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_grads_close({k: v for k, v in grads.items() if k not in skip},
                       {k: v for k, v in ref_grads.items() if k not in skip})


@pytest.mark.parametrize("schedule, extra", [
    ("1f1b", ("moe.capacity_factor=4.0",)),  # capacity C = T: no token dropped
    ("1f1b", ("moe.dispatch=dropless", "memory.remat=full")),  # the stages' mixed stack under remat, too
    pytest.param("afab", ("moe.capacity_factor=4.0",), marks=pytest.mark.slow),
    pytest.param("interleaved", ("moe.dispatch=dropless", "pipeline.virtual_stages=2", "model.num_layers=8"),
                 marks=pytest.mark.slow),
])
def test_pipeline_with_expert_parallel_moe_matches_single_device(schedule, extra):
    model = tuple(o for o in extra if o.startswith(("model.", "moe.")))
    metrics, grads = metrics_and_grads("pp2-ep4-moe", *PP2_EP4, f"pipeline.schedule={schedule}", *extra)
    ref_metrics, ref_grads = metrics_and_grads("moe-single", "moe.every_n_layers=2", "train.grad_accum=2", *model)
    assert float(np.sum(metrics["moe_dropped"])) == 0.0
    assert float(np.sum(metrics["moe_load"])) == 2 * 8 * 16 * ref_metrics["moe_load"].shape[0]  # k x B x T per layer
    assert_matches_one_device(metrics, grads, ref_metrics, ref_grads)


def test_pipeline_moe_program_exchanges_tokens_over_expert_inside_the_stages():
    """The compiled pipelined step holds the expert all-to-alls: the exchange runs inside the stages."""
    cfg = preset("pp2-ep4-moe", *TINY, *PP2_EP4)
    rules, st = setup(cfg)
    hlo = jax.jit(build_grad_fn(cfg, rules, st)).lower(st.abstract.params, synthetic_batch(cfg, 0)).as_text()
    assert "all_to_all" in hlo or "all-to-all" in hlo


@pytest.mark.slow  # default suite under 20 minutes
def test_pipeline_moe_with_bias_balancing_and_drops_matches_single_device():
    """Aux-loss-free balancing reads the step's per-expert loads (`moe_load`, equal to one device's), and a
    capacity that drops tokens drops the same ones (capacity ranks each sequence: rows never split)."""
    extra = ("moe.bias_update_rate=0.01", "moe.capacity_factor=0.5")
    metrics, grads = metrics_and_grads("pp2-ep4-moe", *PP2_EP4, *extra)
    ref_metrics, ref_grads = metrics_and_grads("moe-single", "moe.every_n_layers=2", "train.grad_accum=2", *extra)
    assert float(np.sum(ref_metrics["moe_dropped"])) > 0  # the case drops tokens
    assert not np.any(grads["moe"]["router_bias"]) and not np.any(ref_grads["moe"]["router_bias"])
    assert_matches_one_device(metrics, {**grads, "moe": {k: v for k, v in grads["moe"].items() if k != "router_bias"}},
                              ref_metrics,
                              {**ref_grads, "moe": {k: v for k, v in ref_grads["moe"].items() if k != "router_bias"}})


def test_pipeline_moe_with_context_parallel_capacity_drops_the_same_copies_as_one_device():
    """pipe 2 x context 2 x expert 2 with a capacity that drops: each stage gathers its sequence's routing over
    `context` and ranks the copies of whole sequences in the natural column order (parallel/ops.py StageOps
    `capacity_positions`), so the same copies drop as on one device, with the zigzag layout."""
    extra = ("moe.capacity_factor=0.5",)
    metrics, grads = metrics_and_grads("pp2-ep4-moe", "mesh.pipe=2", "mesh.context=2", "mesh.expert=2", "mesh.data=1",
                                       "mesh.num_devices=8", "pipeline.microbatches=2", *extra)
    ref_metrics, ref_grads = metrics_and_grads("moe-single", "moe.every_n_layers=2", "train.grad_accum=2", *extra)
    assert float(np.sum(ref_metrics["moe_dropped"])) > 0
    assert_matches_one_device(metrics, grads, ref_metrics, ref_grads)


FIVE_D = """
import sys
sys.path.insert(0, "tests")
import numpy as np
import jax
from test_pipeline_moe import metrics_and_grads, assert_matches_one_device
assert jax.device_count() == 32
five_d = metrics_and_grads("5d-32")
one = metrics_and_grads("5d-32", "mesh.num_devices=1", "mesh.pipe=1", "mesh.data=1", "mesh.context=1",
                        "mesh.expert=1", "mesh.tensor=1", "pipeline.schedule=none", "train.grad_accum=2")
assert_matches_one_device(*five_d, *one)
print("5d ok", float(five_d[0]["loss"]), float(one[0]["loss"]))
"""


@pytest.mark.slow  # its own process of 32 virtual devices (about a minute); the default suite is over 20 minutes
def test_five_d_preset_on_32_devices_matches_single_device():
    """pipe 2 x data 2 x context 2 x expert 2 x tensor 2, the MoE model with dense layers between (meshes/5d-32.yaml)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=32", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", FIVE_D], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=900)
    assert run.returncode == 0 and "5d ok" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
