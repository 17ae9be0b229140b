"""Remat policies give the gradients of no remat; the compile-only estimate splits memory correctly; the
planner's choice fits its budget and the faster option it rejected does not."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import MESHES, ROOT, preset, setup, synthetic_batch
from picotron_jax.cli import main
from picotron_jax.config import MemoryConfig
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.memory.planner import candidate_space, choose, configured, plan
from picotron_jax.units import parse_bytes
from picotron_jax.observe.memory import apply_allocator_settings, device_memory_stats, live_arrays_stats
from picotron_jax.train.state import init_params, init_train_state
from picotron_jax.train.step import build_grad_fn, build_train_step

SMALL = ("model.num_layers=2",)


def grads_for(*overrides):
    cfg = preset("single", *SMALL, *overrides)
    rules, st = setup(cfg)
    _, grads = build_grad_fn(cfg, rules, st)(init_params(cfg, st), synthetic_batch(cfg, 0, rules))
    return jax.tree.map(np.asarray, grads)


@functools.lru_cache(maxsize=None)
def no_remat_grads():
    return grads_for("memory.remat=none")


@pytest.mark.parametrize("remat", ["full:1,dots:1", "save_attn:1,names:1", "save_qkv:1,offload_attn:1"])  # two per run
def test_remat_policy_gives_the_gradients_of_no_remat(remat):
    """Recomputation repeats the same fp32 operations; only XLA's fusion may reorder a sum (a few ulps)."""
    grads = grads_for(f"memory.remat={remat}", "memory.remat_names=wq,wk,wv,w_down")
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(no_remat_grads())):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(r))),
                                   err_msg=jax.tree_util.keystr(path))


PLAN_CFG = preset("single", *SMALL, "train.seq_len=64")


@functools.lru_cache(maxsize=None)
def plan_table():
    """remat none/full on one device, compiled only, fastest first."""
    return plan(PLAN_CFG, jax.devices()[:1], candidate_space(PLAN_CFG, 1, remats=["none", "full"], accums=[1]))


def test_estimate_splits_state_and_remat_cuts_temporaries():
    by_key = {c.remat: c.estimate for c in plan_table()}
    single, full = by_key["none"], by_key["full"]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup(PLAN_CFG)[1].spec.shapes))
    assert single.params_bytes == 4 * n_params and single.opt_state_bytes >= 2 * 4 * n_params
    assert single.grads_bytes == 4 * n_params
    assert single.peak_bytes >= single.argument_bytes + single.temp_bytes
    assert full.activations_bytes < 0.7 * single.activations_bytes
    assert full.flops > 1.15 * single.flops  # the recomputed forward matmuls are counted


def test_planner_choice_fits_and_the_faster_rejected_option_does_not():
    cfg, devices, table = PLAN_CFG, jax.devices()[:1], plan_table()
    assert table[0].remat == "none" and table[0].grad_accum == 1  # no recompute, one microbatch: fastest
    # a budget between the second- and the first-fastest candidate's peak
    peaks = [c.peak for c in table]
    budget = (peaks[0] + min(peaks[1:])) // 2
    assert min(peaks[1:]) < budget < peaks[0], peaks
    choice = choose(table, budget)
    assert choice is not None and choice is not table[0]
    assert all(rejected.peak > budget for rejected in table[: table.index(choice)])  # the faster ones do not fit
    chosen_cfg = configured(cfg, choice.remat, choice.grad_accum, choice.zero_stage)
    rules, st = setup(chosen_cfg)  # the chosen configuration runs, and its own compiled step fits
    state = init_train_state(chosen_cfg, st)
    batch = synthetic_batch(chosen_cfg, 0, rules)
    compiled = build_train_step(chosen_cfg, rules, st).lower(state, batch).compile()
    m = compiled.memory_analysis()
    assert m.argument_size_in_bytes + m.temp_size_in_bytes <= budget
    _, metrics = compiled(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    stats = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # accelerators: what the allocator actually saw
        assert stats["peak_bytes_in_use"] <= budget


def test_memory_command_and_its_errors(capsys, tmp_path):
    out_json = tmp_path / "zero3.json"
    assert main(["memory", "--config", str(MESHES / "zero3-dp8.yaml"), *SMALL, "train.seq_len=64",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for part in ("parameters", "optimizer state", "gradients", "activations/temporaries", "peak (estimated)",
                 "data=8", "ZeRO-3"):
        assert part in out
    zero3 = json.loads(out_json.read_text())
    single = next(c.estimate for c in plan_table() if c.remat == "none")  # same model on one device
    assert zero3["params_bytes"] * 8 == single.params_bytes  # every parameter splits on `embed`
    assert zero3["opt_state_bytes"] * 8 == pytest.approx(single.opt_state_bytes, abs=64)  # Adam counters stay
    assert zero3["collective_bytes"] > 0
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(UserError, match="--budget"):
        parse_bytes("lots")
    assert main(["memory", "--config", str(MESHES / "single.yaml"), "--plan"]) == 2
    assert "--plan needs --budget" in capsys.readouterr().err
    assert main(["memory", "--config", str(MESHES / "dp8.yaml"), "mesh.data=16"]) == 2
    assert "needs 16 devices" in capsys.readouterr().err
    assert main(["memory", "--config", str(MESHES / "single.yaml"), "memory.remat=full:1,none:1"]) == 2
    assert "'memory.remat'" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_command_compiles_a_mesh_larger_than_the_machine():
    """A fresh process asks XLA for 32 virtual CPU devices and compiles data=8 x tensor=4 for them."""
    out = subprocess.run(
        [sys.executable, "-m", "picotron_jax", "memory", "--config", str(MESHES / "tp4-dp2.yaml"), "mesh.data=8",
         "train.global_batch=32", "train.zero_stage=3", *SMALL],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert "32 cpu device(s)" in out.stdout and "data=8" in out.stdout and "tensor=4" in out.stdout


def test_allocator_settings_readings_and_memory_config_errors(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert apply_allocator_settings(MemoryConfig()) == ""  # JAX's defaults: nothing to set
    # the test process started JAX long ago: the settings cannot apply, and the warning says what to do
    warning = apply_allocator_settings(MemoryConfig(preallocate=False, fraction=0.5))
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.500" in warning
    assert device_memory_stats(jax.devices()) == {}  # XLA:CPU has no allocator statistics
    assert live_arrays_stats()["live_arrays"] >= 0
    for override, message in (("memory.remat=most", "'memory.remat' = 'most'"),
                              ("memory.remat=full:1", "cover 1 layers but model.num_layers = 4"),
                              ("memory.remat=names", "'memory.remat_names'"),
                              ("memory.fraction=1.5", "'memory.fraction' = 1.5")):
        with pytest.raises(UserError, match=message):
            validate(preset("single", override), 1)
