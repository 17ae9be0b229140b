"""Expert parallelism keeps the math: the MoE model's loss, gradients and routing statistics on
expert=8, expert=4 x tensor=2 and data=2 x expert=4 equal the single-device run.

Capacity mode runs with capacity_factor = E / k, so C = T and nothing drops; then capacity and
dropless compute the same function, and one single-device reference serves both. Tolerances as
tests/test_layouts.py (only the order of cross-device sums differs).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from helpers import preset, setup, synthetic_batch
from picotron_jax.observe.hlo import collective_bytes
from picotron_jax.train.state import init_params
from picotron_jax.train.step import build_grad_fn
from test_layouts import assert_grads_close

NO_DROPS = "moe.capacity_factor=4"  # 8 experts, top-2: C = ceil(T * 2 / 8 * 4) = T


def loss_grads_metrics(cfg):
    rules, st = setup(cfg)
    metrics, grads = build_grad_fn(cfg, rules, st)(init_params(cfg, st), synthetic_batch(cfg, 0, rules))
    return jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, grads)


@functools.lru_cache(maxsize=None)
def reference(*overrides):
    return loss_grads_metrics(preset("moe-single", NO_DROPS, *overrides))


def assert_same_as_single_device(metrics, grads, *reference_overrides):
    ref_metrics, ref_grads = reference(*reference_overrides)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_array_equal(metrics["moe_load"], ref_metrics["moe_load"])  # same routing decisions
    np.testing.assert_allclose(metrics["moe_aux"], ref_metrics["moe_aux"], rtol=1e-5)
    np.testing.assert_allclose(metrics["moe_z"], ref_metrics["moe_z"], rtol=1e-5)
    assert float(np.max(metrics["moe_dropped"])) == 0.0
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("name,overrides", [
    ("moe-ep8", [NO_DROPS]),
    ("moe-ep4-tp2", [NO_DROPS]),
    ("moe-dropless-dp2-ep4", []),
    pytest.param("moe-ep4-tp2", ["moe.dispatch=dropless"], marks=pytest.mark.slow),
])
def test_expert_parallel_matches_single_device(name, overrides):
    assert_same_as_single_device(*loss_grads_metrics(preset(name, *overrides)))


@pytest.mark.slow
def test_dropless_single_device_equals_capacity_without_drops():
    assert_same_as_single_device(*loss_grads_metrics(preset("moe-single", "moe.dispatch=dropless")))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["mesh.expert=4", "mesh.data=2", "train.zero_stage=3", NO_DROPS],
    ["mesh.expert=2", "mesh.data=2", "mesh.tensor=2", "train.zero_stage=1", NO_DROPS],
    ["mesh.expert=2", "mesh.context=2", "mesh.data=2", NO_DROPS],
    ["mesh.expert=2", "mesh.context=2", "mesh.tensor=2", "moe.dispatch=dropless"],
])
def test_expert_parallel_composes_with_zero_tensor_and_context(overrides):
    cfg = preset("moe-ep8", "mesh.expert=1", *overrides)
    assert_same_as_single_device(*loss_grads_metrics(cfg))


@pytest.mark.slow
def test_grad_accumulation_matches_single_device_with_the_same_microbatches():
    """The balancing losses are means over each microbatch (nonlinear in its routing counts), so
    accumulation changes them: the reference accumulates over the same microbatches."""
    cfg = preset("moe-ep4-tp2", "mesh.data=2", "mesh.expert=2", "train.grad_accum=2", NO_DROPS)
    assert_same_as_single_device(*loss_grads_metrics(cfg), "train.grad_accum=2")


@pytest.mark.slow
def test_capacity_all_to_all_bytes_match_the_dispatch():
    """Per MoE layer and step, each device sends its [E, b, C, D] buffer through all_to_all twice
    forward (there and back) and twice backward: 4 x b*E*C*D*4 bytes (fp32)."""
    cfg = preset("moe-ep8")
    rules, st = setup(cfg)
    params, batch = init_params(cfg, st), synthetic_batch(cfg, 0, rules)
    hlo = build_grad_fn(cfg, rules, st).lower(params, batch).compile().as_text()
    b = cfg.train.global_batch // 8
    T, E, D, L = cfg.train.seq_len, 8, cfg.model.hidden_size, cfg.model.num_layers
    C = int(np.ceil(T * 2 / E * cfg.moe.capacity_factor))
    assert collective_bytes(hlo)["all-to-all"] == L * 4 * b * E * C * D * 4
