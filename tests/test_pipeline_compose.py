"""The pipeline runs the model's own pieces, so the plain step's features compose with it: remat
policies (whole-model and per-layer segments), precision policies (bf16, fp16 with loss scaling and
overflow skipping, per-module overrides), replicated KV heads, context parallelism. Each against the single-device run of the same tiny model
(2 layers, width 32, seq 16; pipe = 2, one layer per stage, 2 microbatches)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from helpers import preset, setup, synthetic_batch
from test_layouts import assert_grads_close
from picotron_jax.run import build_run
from picotron_jax.train.state import init_params, init_train_state
from picotron_jax.train.step import build_grad_fn

TINY = ("model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=4")
PP2 = ("mesh.pipe=2", "mesh.data=1", "mesh.num_devices=2", "pipeline.microbatches=2")


def grads_of(*overrides):
    return grads_of_preset("single", *TINY, *overrides)


@functools.lru_cache(maxsize=None)
def single_device(*overrides):
    return grads_of(*overrides)


@pytest.mark.parametrize("schedule,remat", [("1f1b", "full"), ("afab", "full:1,none:1")])
def test_pipeline_with_remat_matches_single_device(schedule, remat):
    """`full` everywhere, and a per-layer segment policy that gives the two stages different layer stacks
    (the stage program switches on the stage's index)."""
    loss, grads = grads_of(*PP2, f"pipeline.schedule={schedule}", f"memory.remat={remat}")
    ref_loss, ref_grads = single_device()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_pipeline_bf16_with_a_per_module_override_matches_single_device():
    """Same loss; gradients within bf16 rounding (8 mantissa bits, 2^-8 = 0.4% per rounding): the pipeline
    rounds each microbatch's bf16 gradient before summing in fp32, one device rounds the whole batch's."""
    precision = ("precision.mode=bf16", "precision.overrides=head:fp32")
    loss, grads = grads_of(*PP2, "pipeline.schedule=1f1b", *precision)
    ref_loss, ref_grads = single_device(*precision)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        r = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
        np.testing.assert_allclose(g, r, rtol=2e-2, atol=1e-2 * float(np.max(np.abs(r))),
                                   err_msg=jax.tree_util.keystr(path))


def test_pipeline_with_kv_heads_replicated_over_tensor_matches_single_device():
    """2 KV heads on tensor = 4 (pipe 2 x tensor 4): each rank keeps both KV heads, as the plain path's rules
    do, and its query head takes its own (parallel/ops.py StageOps)."""
    loss, grads = grads_of("mesh.pipe=2", "mesh.tensor=4", "mesh.data=1", "mesh.num_devices=8",
                           "pipeline.microbatches=2", "pipeline.schedule=1f1b")
    ref_loss, ref_grads = single_device()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("schedule, extra", [
    ("1f1b", ()),
    pytest.param("afab", ("train.context_zigzag=false",), marks=pytest.mark.slow),  # the contiguous layout
    pytest.param("interleaved", ("pipeline.virtual_stages=2", "model.num_layers=4", "mesh.data=1", "mesh.tensor=2",
                                 "model.num_kv_heads=1"), marks=pytest.mark.slow),
])
def test_pipeline_with_context_parallel_matches_single_device(schedule, extra):
    """pipe 2 x context 2 x data 2: each stage's attention takes every context rank's keys and values
    (all-gathered over `context`, parallel/context.py gathered_kv_attention), the rotary positions and the
    causal mask follow the run's column layout (zigzag by default). The slow cases: the contiguous layout
    under AFAB, and interleaved chunks with tensor 2 and one KV head replicated over it."""
    loss, grads = grads_of("mesh.pipe=2", "mesh.context=2", "mesh.data=2", "mesh.num_devices=8",
                           "pipeline.microbatches=2", f"pipeline.schedule={schedule}", *extra)
    ref_loss, ref_grads = single_device(*(o for o in extra if o.startswith("model.")))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


def fp16_rows(*overrides):
    """Metrics of 3 fp16 steps with the fault injector's NaN in the gradient of layer 1 (stage 1) at step 2."""
    cfg = preset("single", *TINY, "precision.mode=fp16", "precision.promote_after=0", "faults.nan_step=2",
                 "faults.nan_layer=1", "faults.nan_site=gradient", *overrides)
    run = build_run(cfg, data=False)
    state, rows = init_train_state(cfg, run.setup), []
    for i in range(3):
        state, metrics = run.step(state, synthetic_batch(cfg, i, run.rules), i + 1)
        rows.append({k: float(metrics[k]) for k in ("loss", "skipped_steps", "loss_scale")})
    return rows


def test_pipeline_fp16_overflow_skips_exactly_that_step_as_on_one_device():
    """Loss scaling through the pipeline (the backward starts from the loss scale / tokens) and an in-step
    fault (`faults` section) through the stage program: the poisoned step is skipped and the scale halves,
    exactly as on one device. Losses: step 1 within 1e-5 (the same fp16 forward); later steps within 1e-4,
    since the pipeline rounds each microbatch's fp16 gradients (2^-11 per rounding) before summing them."""
    pipe, one = fp16_rows(*PP2, "pipeline.schedule=1f1b"), fp16_rows()
    assert [r["skipped_steps"] for r in pipe] == [r["skipped_steps"] for r in one] == [0, 1, 1]
    assert [r["loss_scale"] for r in pipe] == [r["loss_scale"] for r in one] == [2.0**15, 2.0**14, 2.0**14]
    np.testing.assert_allclose(pipe[0]["loss"], one[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in pipe], [r["loss"] for r in one], rtol=1e-4)


def test_moe_with_remat_matches_moe_without():
    """The mixed dense/MoE stack runs each layer under the remat policy (train/remat.py LayerStack.remat_block):
    same loss and gradients (aux losses included) as without remat, and the policy is in the program."""
    moe = (*TINY, "model.num_layers=2", "moe.first_dense_layers=1", "moe.expert_size=32")
    cfg = preset("moe-single", *moe, "memory.remat=full")
    rules, st = setup(cfg)
    jaxpr = jax.make_jaxpr(build_grad_fn(cfg, rules, st))(st.abstract.params, synthetic_batch(cfg, 0))
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)
    (loss, grads), (ref_loss, ref_grads) = (grads_of_preset("moe-single", *moe, f"memory.remat={r}")
                                            for r in ("full", "none"))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


def grads_of_preset(name, *overrides):
    cfg = preset(name, *overrides)
    rules, st = setup(cfg)
    metrics, grads = build_grad_fn(cfg, rules, st)(init_params(cfg, st), synthetic_batch(cfg, 0, rules))
    return float(metrics["loss"]), jax.tree.map(np.asarray, grads)
