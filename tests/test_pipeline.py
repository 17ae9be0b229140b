"""Pipeline parallelism: schedule tables (pure Python), config errors, and same math as one device.

Numerics use test_layouts' single-device reference and tolerances: every schedule's loss and
gradients equal the unpipelined run within fp32 summation-order noise.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from helpers import preset, run_steps, setup, synthetic_batch
from test_layouts import assert_grads_close, reference
from picotron_jax.cli import main
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.parallel.pipeline_schedule import build_schedule, idle_share, render
from picotron_jax.train.state import init_params
from picotron_jax.train.step import build_grad_fn, build_train_step

# ----------------------------------------------------------------------------- schedule tables

GRID = [("afab", p, m, 1) for p in (2, 3, 4) for m in (1, 2, 5, 8)]
GRID += [("1f1b", p, m, 1) for p in (2, 3, 4) for m in (1, 2, 5, 8, 16)]
GRID += [("interleaved", p, m, v) for p in (2, 4) for v in (2, 3) for m in (p, 2 * p, 4 * p)]


@pytest.mark.parametrize("kind,p,m,v", GRID)
def test_schedule_runs_every_op_once_in_dependency_order(kind, p, m, v):
    s = build_schedule(kind, p, m, v)
    n = p * v
    when = {}
    for t in range(s.num_slots):
        for r in range(p):
            for op, work in (("F", s.forward[t][r]), ("B", s.backward[t][r])):
                if work is not None:
                    c, i = work
                    assert (op, c * p + r, i) not in when, f"{op}{i} of stage {c * p + r} runs twice"
                    when[(op, c * p + r, i)] = t
            assert s.forward[t][r] is None or s.backward[t][r] is None, "one op per rank per slot"
    assert len(when) == 2 * n * m
    for st, i in itertools.product(range(n), range(m)):
        assert when[("F", st, i)] < when[("B", st, i)]
        if st > 0:  # its input arrives at the end of the previous stage's slot
            assert when[("F", st - 1, i)] < when[("F", st, i)]
        if st < n - 1:
            assert when[("B", st + 1, i)] < when[("B", st, i)]


@pytest.mark.parametrize("kind,p,m,v", GRID)
def test_counted_bubble_equals_the_analytic_value(kind, p, m, v):
    s = build_schedule(kind, p, m, v)
    expected = (p - 1) / ((v if kind == "interleaved" else 1) * m + p - 1)
    assert s.bubble_fraction() == pytest.approx(expected)
    assert s.analytic_bubble_fraction() == pytest.approx(expected)


def test_interleaving_shrinks_the_bubble_and_1f1b_bounds_memory_by_p():
    afab, one, inter = (build_schedule(k, 4, 16, 2) for k in ("afab", "1f1b", "interleaved"))
    assert afab.bubble_fraction() == pytest.approx(one.bubble_fraction()) == pytest.approx(3 / 19)
    assert inter.bubble_fraction() == pytest.approx(3 / 35)
    assert inter.bubble_fraction() < one.bubble_fraction()
    assert one.max_in_flight() == [4, 3, 2, 1]  # p - rank, independent of m
    assert afab.max_in_flight() == [16] * 4
    assert one.act_slots == 4 and afab.act_slots == 16


def test_time_weighted_idle_share_by_hand_and_dataflow_equals_the_analytic_bubble():
    """p = 2, m = 2, 1F1B, B = 3F. Slots (r0 | r1): F0 | . ; F1 | F0 ; . | B0 ; B0 | F1 ; . | B1 ; B1 | .
    Lockstep slot lengths 1 1 3 3 3 3 = 14, busy 2 x (2 + 6) = 16: idle 1 - 16/28 = 3/7. Dataflow: r0's last
    B ends at 12 (F0 F1 | wait B0 of r1 at 5 | B0 5-8 | wait B1 of r1 at 9 | B1 9-12): 1 - 16/24 = 1/3."""
    share = idle_share(build_schedule("1f1b", 2, 2), 1.0, 3.0)
    assert share["lockstep"] == pytest.approx(3 / 7) and share["dataflow"] == pytest.approx(1 / 3)
    for kind, p, m, v in GRID:
        s = build_schedule(kind, p, m, v)
        for ratio in (1.0, 2.0, 3.0):
            got = idle_share(s, 1.0, ratio)
            if kind != "interleaved":  # the papers' bubble (p-1)/(m+p-1) holds for any B/F ratio
                assert got["dataflow"] == pytest.approx(s.analytic_bubble_fraction())
            assert got["lockstep"] >= got["dataflow"] - 1e-12
        assert idle_share(s, 1.0, 1.0)["lockstep"] == pytest.approx(s.bubble_fraction())  # unit costs: counted
    # the lockstep executor: 1F1B's mixed F/B slots last a B on every rank; AFAB's phases do not mix
    afab, one = (idle_share(build_schedule(k, 4, 16), 1.0, 3.0)["lockstep"] for k in ("afab", "1f1b"))
    assert afab == pytest.approx(3 / 19) and one == pytest.approx(0.396, abs=1e-3)


def test_the_train_banner_prints_the_counted_and_the_time_weighted_bubbles():
    from picotron_jax.observe.console import banner
    from picotron_jax.run import build_run

    run = build_run(preset("pp4-1f1b", "pipeline.microbatches=16", "train.global_batch=32"), data=False)
    (line,) = [x for x in banner(run, 1e9, "test") if x.startswith("pipeline 1f1b")]
    share = idle_share(build_schedule("1f1b", 4, 16), 1.0, 2.0)  # no remat: B is the backward alone
    assert "bubble 0.158 counted" in line and f"(B = 2F) {share['lockstep']:.3f} lockstep / 0.158 dataflow" in line
    run = build_run(preset("pp4-1f1b", "pipeline.microbatches=16", "train.global_batch=32", "memory.remat=full"),
                    data=False)
    (line,) = [x for x in banner(run, 1e9, "test") if x.startswith("pipeline 1f1b")]
    assert f"(B = 3F) {idle_share(build_schedule('1f1b', 4, 16), 1.0, 3.0)['lockstep']:.3f} lockstep" in line


def test_render_shows_every_rank_and_the_bubble():
    text = render(build_schedule("1f1b", 2, 4))
    lines = text.splitlines()
    assert lines[2].split()[:4] == ["rank", "0", "F0", "F1"] and lines[3].split()[:4] == ["rank", "1", ".", "F0"]
    assert "bubble 0.200 counted" in text and "0.200 analytic" in text
    assert "F0a" in render(build_schedule("interleaved", 2, 2, 2))


def test_cli_prints_the_schedule_of_a_config(capsys):
    assert main(["pipeline-schedule", "--config", "meshes/pp4-1f1b.yaml", "pipeline.microbatches=4"]) == 0
    out = capsys.readouterr().out
    assert "schedule 1f1b: p=4 pipe ranks, m=4 microbatches" in out and "rank 3" in out


# ----------------------------------------------------------------------------------- bad input


def pipeline_error(name, *overrides) -> str:
    with pytest.raises(UserError) as info:
        validate(preset(name, *overrides), 8)
    return str(info.value)


def test_bad_pipeline_configs_name_the_field():
    msg = pipeline_error("pp2-afab", "pipeline.schedule=none")
    assert "mesh.pipe" in msg and "pipeline.schedule" in msg
    msg = pipeline_error("dp8", "pipeline.schedule=1f1b")
    assert "pipeline.schedule" in msg and "'1f1b'" in msg and "mesh.pipe > 1" in msg
    msg = pipeline_error("pp2-afab", "pipeline.schedule=zb")
    assert "pipeline.schedule" in msg and "interleaved" in msg
    msg = pipeline_error("pp2-interleaved", "pipeline.microbatches=3", "train.global_batch=24")
    assert "pipeline.microbatches" in msg and "= 3" in msg and "multiple of 2" in msg
    msg = pipeline_error("pp4-1f1b", "pipeline.schedule=interleaved")
    assert "model.num_layers" in msg and "4 x 2 = 8" in msg
    msg = pipeline_error("pp4-1f1b", "model.num_layers=6")
    assert "model.num_layers" in msg and "6" in msg
    msg = pipeline_error("pp2-afab", "train.grad_accum=2")
    assert "train.grad_accum" in msg and "pipeline.microbatches" in msg
    msg = pipeline_error("pp2-afab", "pipeline.microbatches=3")
    assert "train.global_batch" in msg and "pipeline.microbatches = 3" in msg


# ------------------------------------------------------------------ same math as one device


def grads_of(cfg):
    rules, st = setup(cfg)
    params = init_params(cfg, st)
    metrics, grads = build_grad_fn(cfg, rules, st)(params, synthetic_batch(cfg, 0, rules))
    return float(metrics["loss"]), jax.tree.map(np.asarray, grads)


def test_3d_pipe_data_tensor_trains_like_one_device():
    losses, grads = run_steps(preset("pp2-dp2-tp2"))
    ref_losses, ref_grads = reference()
    assert losses[2] < losses[0], "training did not move the loss"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


FAST = [("pp4-1f1b", "pipeline.schedule=afab"), ("pp2-interleaved",)]  # + 1F1B in the 3D test above
SLOW = [
    ("pp4-1f1b",),
    ("pp2-afab",),
    ("pp2-afab", "pipeline.schedule=1f1b"),
    ("pp2-interleaved", "pipeline.microbatches=2", "train.zero_stage=3"),
    ("pp2-dp2-tp2", "pipeline.schedule=afab", "train.zero_stage=1"),
]


@pytest.mark.parametrize("layout", FAST + [pytest.param(s, marks=pytest.mark.slow) for s in SLOW],
                         ids=lambda s: " ".join(s))
def test_schedule_gradients_match_single_device(layout):
    loss, grads = grads_of(preset(*layout))
    ref_losses, ref_grads = reference()
    np.testing.assert_allclose(loss, ref_losses[0], rtol=1e-5)
    assert_grads_close(grads, ref_grads)


@pytest.mark.slow
def test_tied_embeddings_get_both_ends_gradients():
    loss, grads = grads_of(preset("pp2-dp2-tp2", "model.tie_embeddings=true"))
    ref_loss, ref_grads = grads_of(preset("single", "model.tie_embeddings=true"))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


def step_temp_bytes(cfg) -> int:
    """Per-device temporary bytes of the compiled train step (XLA's buffer assignment; deterministic)."""
    return step_cost(cfg)[1]


@pytest.mark.slow
def test_1f1b_needs_no_more_memory_than_afab():
    """p = 4, m = 16, no remat. Both schedules keep each microbatch's stage residuals from its F to its B
    (parallel/pipeline_residuals.py): AFAB those of all m, 1F1B of at most p - r; neither recomputes."""
    overrides = ("pipeline.microbatches=16", "train.global_batch=32")
    afab = step_temp_bytes(preset("pp4-1f1b", *overrides, "pipeline.schedule=afab"))
    one = step_temp_bytes(preset("pp4-1f1b", *overrides))
    assert one < afab, (one, afab)


TINY = ("model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "mesh.data=1", "mesh.num_devices=2")


def test_afab_memory_per_microbatch_does_not_grow_with_the_parameters():
    """AFAB temporaries grow per microbatch by one stage's saved residuals (its activations, about 121 KB
    here), whatever the vocabulary: the stage weights and the [V, D] head are not kept per slot (they were,
    when `jax.grad` differentiated the scanned forward slots: +229,376 bytes per microbatch at V = 2048 vs
    256, exactly one [V, D] table). m = 8 -> 16, where the loop's buffers make the peak at both sizes (at
    m <= 4 and V = 2048 the peak is in the optimizer update, after the loop)."""
    growth = {}
    for V in (256, 2048):
        temps = [step_temp_bytes(preset("pp2-afab", *TINY, f"model.vocab_size={V}", f"pipeline.microbatches={m}",
                                        f"train.global_batch={2 * m}")) for m in (8, 16)]
        growth[V] = (temps[1] - temps[0]) / 8
    assert all(g > 2 * 16 * 32 * 4 for g in growth.values()), growth  # at least one [2, 16, 32] f32 input each
    assert abs(growth[2048] - growth[256]) < (2048 - 256) * 32 * 4 / 16, growth


@pytest.mark.parametrize("schedule", ["afab", "1f1b"])
def test_program_size_does_not_grow_with_microbatches(schedule):
    """One scan step per slot: the traced program is the same for m = 2 and m = 8 (only the tables grow).
    The microbatch size stays 4 sequences, so only m changes."""
    sizes = []
    for m in (2, 8):
        cfg = preset("pp2-afab", f"pipeline.schedule={schedule}", f"pipeline.microbatches={m}", "mesh.data=2",
                     "mesh.num_devices=4", f"train.global_batch={4 * m}")
        rules, st = setup(cfg)
        jaxpr = jax.make_jaxpr(build_grad_fn(cfg, rules, st))(st.abstract.params, synthetic_batch(cfg, 0))
        sizes.append(count_equations(jaxpr.jaxpr))
    assert sizes[0] == sizes[1]


def count_equations(jaxpr) -> int:
    """Equations of a jaxpr, including those of the jaxprs nested in scan, cond, shard_map, ..."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += count_equations(inner)
    return total


def step_cost(cfg) -> tuple[float, int]:
    """(FLOPs of the compiled train step as XLA counts them: a loop body once, every branch; temporary bytes)."""
    rules, st = setup(cfg)
    shapes = {k: jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len),
                                      np.float32 if k == "mask" else np.int32, sharding=rules.batch_sharding())
              for k in ("inputs", "targets", "mask")}
    compiled = build_train_step(cfg, rules, st).lower(st.abstract, shapes).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]), compiled.memory_analysis().temp_size_in_bytes


def test_1f1b_stores_activations_and_recomputes_only_under_remat():
    """1F1B's B runs the pullback its F saved: without remat the slot body does F + 2F of layer work and keeps
    the in-flight microbatches' activations; remat `full` re-runs the forward in B (F + 3F) and keeps only the
    layers' inputs. Measured (pp2, the presets' model): 61.6 vs 70.9 MFLOP, 7.57 vs 5.14 MB of temporaries.
    (When every B re-ran the stage, both held only stage inputs and their temporaries were about equal.)"""
    none = step_cost(preset("pp2-afab", "pipeline.schedule=1f1b", "memory.remat=none"))
    full = step_cost(preset("pp2-afab", "pipeline.schedule=1f1b", "memory.remat=full"))
    assert none[0] < 0.9 * full[0], (none, full)
    assert none[1] > 1.2 * full[1], (none, full)
