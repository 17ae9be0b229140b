"""The XLA:CPU terms of the layout step-time model and its calibration: thunk counts and bytes of an
HLO module by hand and of a compiled loop, the host copy bytes of collectives, the priced terms by
hand, the fit recovering known per-term factors, and `search --calibrate` re-ranking by the fitted
rates (compile and measurement replaced by known figures: nothing compiles or runs there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from picotron_jax.config import load_config
from picotron_jax.tune import layout as tune_layout
from picotron_jax.tune.calibrate import TERMS, calibrated, fit_scales, spread_picks
from picotron_jax.tune.cost import Collectives, Hardware, collectives_by_axes, predict_step
from picotron_jax.tune.space import Layout
from picotron_jax.tune.work import thunk_work

HLO = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %a = f32[4]{0} add(%p, %p)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  %y = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused
  ROOT %r = (s32[], f32[4]{0}) tuple(%j, %y)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%br_a (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

%br_b (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %e = f32[4]{0} exponential(%p)
  ROOT %l = f32[4]{0} log(%e)
}

ENTRY %main (x: f32[4], pr: pred[]) -> f32[8] {
  %x = f32[4]{0} parameter(0)
  %pr = pred[] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %x)
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = f32[4]{0} get-tuple-element(%w), index=1
  %k = f32[4]{0} conditional(%pr, %out, %out), true_computation=%br_a, false_computation=%br_b
  ROOT %c = f32[8]{0} concatenate(%k, %k), dimensions={0}
}
"""


def test_thunk_work_by_hand():
    # body: add (4 B) + fusion (16 B, its fused computation is inside it) x 3 trips; condition: compare
    # (1 B) x 4; the conditional's costlier branch: exp + log (2 x 16 B); the concatenate (32 B).
    # Parameters, constants, tuples and get-tuple-elements are free; while/conditional are not thunks.
    assert thunk_work(HLO) == {"thunks": 2 * 3 + 4 + 2 + 1, "thunk_bytes": 20 * 3 + 4 + 32 + 32}


def test_thunk_work_grows_with_a_compiled_loop_trip_count():
    def work(n: int) -> dict:
        f = jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda i, y: jnp.sin(y) * y + i, x))
        return thunk_work(f.lower(jnp.ones((64,), jnp.float32)).compile().as_text())

    w4, w8, w12 = work(4), work(8), work(12)
    assert w8["thunks"] - w4["thunks"] == w12["thunks"] - w8["thunks"] > 0  # per iteration, by trip count
    assert w8["thunk_bytes"] - w4["thunk_bytes"] >= 4 * 64 * 4  # each iteration writes the [64] f32 carry


def test_collective_copy_bytes_count_each_buffer_a_reduction_reads():
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 1, 1, 4), ("pipe", "data", "context", "expert", "tensor"))
    x = jax.device_put(jnp.ones((2, 4 * 256), jnp.float32), NamedSharding(mesh, P("data", "tensor")))

    def coll(fn) -> Collectives:
        f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data", "tensor"), out_specs=P("data", None), check_vma=False))
        return collectives_by_axes(f.lower(x).compile().as_text(), (1, 2, 1, 1, 4))

    reduce = coll(lambda v: jax.lax.psum(v, "tensor"))  # 1 KiB per device, read from each of 4 devices
    assert reduce.bytes_by_axes == {"tensor": 1024} and reduce.copy_bytes == 4 * 1024
    gather = coll(lambda v: jax.lax.all_gather(v, "tensor", axis=1, tiled=True))  # its 4 KiB output, once
    assert gather.bytes_by_axes == {"tensor": 4096} and gather.copy_bytes == 4096


HW = Hardware(flops_per_s=1e9, bandwidth={a: 1e9 for a in ("pipe", "data", "context", "expert", "tensor")},
              latency_s=1e-3, shared_host=True, write_bytes_per_s=2e9, thunk_s=1e-6, copy_bytes_per_s=4e9)


def test_cpu_terms_by_hand():
    coll = Collectives({"data": 1_000_000_000}, {"data": 10}, copy_bytes=8_000_000_000)
    p = predict_step(2e9, coll, 0.0, HW, work={"thunks": 500_000, "thunk_bytes": 6_000_000_000})
    assert p["compute_s"] == pytest.approx(2.0)
    assert p["comm_s"] == pytest.approx(2.0)  # the 8 GB of host copies at 4 GB/s, not the 1 GB at the link's rate
    assert p["latency_s"] == pytest.approx(0.01) and p["write_s"] == pytest.approx(3.0)
    assert p["dispatch_s"] == pytest.approx(0.5)
    assert p["step_s"] == pytest.approx(2.0 + 2.0 + 0.01 + 3.0 + 0.5)
    # a pipeline's counted slots hold idle ones: the thunk terms scale by the busy share like the FLOPs
    half = predict_step(2e9, Collectives(), 0.0, HW, busy_share=0.5, work={"thunks": 500_000, "thunk_bytes": 6e9})
    assert half["write_s"] == pytest.approx(1.5) and half["dispatch_s"] == pytest.approx(0.25)
    # a target cluster (no CPU rates) prices only FLOPs and links
    gpu = Hardware(flops_per_s=1e9, bandwidth=HW.bandwidth)
    assert predict_step(2e9, coll, 0.0, gpu, work={"thunks": 9, "thunk_bytes": 9})["step_s"] == pytest.approx(3.0)


def _terms(rng: np.random.Generator, n: int) -> list[dict[str, float]]:
    return [dict(zip([k for k, _ in TERMS], rng.uniform(0.01, 1.0, len(TERMS)))) for _ in range(n)]


def test_fit_recovers_known_factors_and_calibrated_rates_predict_them():
    truth = np.array([2.0, 0.5, 3.0, 0.0, 1.5])  # the step pays 2x the matmul term, no write term, ...
    inputs = np.random.default_rng(0).uniform(1, 100, (8, 5)) * [1e8, 1e8, 1, 1e8, 1e4]

    def predicted(hw: Hardware) -> list[dict[str, float]]:
        return [predict_step(f, Collectives({"data": 1}, {"data": c}, copy_bytes=b), 0.0, hw,
                             work={"thunks": t, "thunk_bytes": w}) for f, b, c, w, t in inputs]

    base = predicted(HW)
    measured = [float(np.dot(truth, [p[k] for k, _ in TERMS])) for p in base]
    scales = fit_scales(base, measured, prior=0.0)
    assert scales == pytest.approx(truth, abs=1e-9)
    hw = calibrated(HW, scales)
    assert hw.write_bytes_per_s == float("inf") and hw.flops_per_s == pytest.approx(HW.flops_per_s / 2)
    assert [p["step_s"] for p in predicted(hw)] == pytest.approx(measured, rel=1e-9)
    # two layouts for five factors: the prior keeps the fit finite and non-negative, close to the data
    few = fit_scales(base[:2], measured[:2])
    assert np.all(few >= 0) and np.all(np.isfinite(few))
    assert [float(np.dot(few, [p[k] for k, _ in TERMS])) for p in base[:2]] == pytest.approx(measured[:2], rel=0.2)


def test_spread_picks_start_from_the_best_predicted_and_never_repeat():
    preds = _terms(np.random.default_rng(1), 7)
    picks = spread_picks(preds, 4)
    assert picks[0] == int(np.argmin([sum(p.values()) for p in preds])) and len(set(picks)) == 4
    assert spread_picks(preds, 20) and len(spread_picks(preds, 20)) == 7 and spread_picks(preds, 0) == []


def test_search_calibrates_then_measures_the_best_by_the_fitted_rates(monkeypatch):
    """Three layouts whose real cost is all in the thunk dispatch the uncalibrated model undervalues:
    the calibration measures 2, fits, and the third is ranked (and measured) by the fitted rates."""
    work = {"d8": (1e9, 1000), "d4 t2": (2e9, 100), "d2 t4": (3e9, 10)}  # (FLOPs, thunks)
    true_s = {k: 1e-3 * t for k, (_, t) in work.items()}  # measured: 1 ms a thunk, matmuls free

    def fake_compile(cfg, devices, cache_dir, keep=None):
        key = " ".join(f"{a[0]}{getattr(cfg.mesh, a)}" for a in ("data", "tensor") if getattr(cfg.mesh, a) > 1)
        flops, thunks = work[key]
        return {"peak_bytes": 1, "flops": flops, "collective_bytes": {}, "collective_counts": {},
                "collective_copy_bytes": 0, "thunks": thunks, "thunk_bytes": 0, "bubble": 0.0,
                "busy_share": 1.0}, False

    measured = []

    def fake_measure(cfg, steps, warmup, compiled=None):
        key = " ".join(f"{a[0]}{getattr(cfg.mesh, a)}" for a in ("data", "tensor") if getattr(cfg.mesh, a) > 1)
        measured.append(key)
        return {"step_s": true_s[key], "tokens_per_s": 1.0 / true_s[key], "cpu_s": true_s[key]}

    monkeypatch.setattr(tune_layout, "compile_cached", fake_compile)
    monkeypatch.setattr(tune_layout, "measure", fake_measure)
    hw = Hardware(flops_per_s=1e9, bandwidth=HW.bandwidth, shared_host=True, thunk_s=1e-6, write_bytes_per_s=1e9,
                  copy_bytes_per_s=1e9)
    layouts = [Layout(data=8), Layout(data=4, tensor=2), Layout(data=2, tensor=4)]
    cfg = load_config(None, ["model.num_heads=4", "model.num_kv_heads=4"])
    info: dict = {}
    results = tune_layout.search(cfg, jax.devices(), layouts, hw, top=1, calibrate=2, calibration=info,
                                 cache_dir=None)
    assert len(measured) == 3 and sorted(x.split(" zero")[0] for x in info["layouts"]) == sorted(measured[:2])
    assert info["factors"]["dispatch_s"] > 100 * info["factors"]["compute_s"]  # the thunks carry the time
    assert [r.layout.label().split(" zero")[0] for r in results] == ["d2 t4", "d4 t2", "d8"]  # fitted order
    assert tune_layout.choose(results).layout.label().startswith("d2 t4")


def test_the_objective_picks_by_wall_or_by_cpu_seconds():
    fast_wall = tune_layout.Result(Layout(data=8), {}, False, measured_step_s=1.0, measured_cpu_s=3.0)
    fast_cpu = tune_layout.Result(Layout(tensor=8), {}, False, measured_step_s=2.0, measured_cpu_s=1.0)
    assert tune_layout.choose([fast_wall, fast_cpu]) is fast_wall
    assert tune_layout.choose([fast_wall, fast_cpu], "cpu") is fast_cpu
