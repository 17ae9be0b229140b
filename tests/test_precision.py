"""Mixed precision: fp32 / bf16 / fp16 track each other, loss scaling skips overflowing steps, per-module
dtypes, promotion of a module that keeps overflowing, and the config's error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import MESHES, preset, primitive_dtypes, setup, synthetic_batch
from picotron_jax.cli import main
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.observe.memory import live_arrays_stats
from picotron_jax.train import precision as mp
from picotron_jax.train.precision_analysis import analyze, write_policy
from picotron_jax.train.state import init_params, init_train_state
from picotron_jax.train.step import build_grad_fn, build_train_step

SMALL = ("model.num_layers=2",)
TRACK_STEPS = 8
# bf16 keeps 8 mantissa bits: per-step relative noise ~ 2^-8 on activations. Measured on this model:
# |loss_bf16 - loss_fp32| <= 0.002 nats over 8 steps; the bound leaves a 10x margin.
TRACK_BOUND = 0.02


def train_losses(cfg, steps, batch_fn=synthetic_batch, params_fn=None):
    """Per-step metrics (host) and host copies of the parameters after every step."""
    rules, st = setup(cfg)
    state = init_train_state(cfg, st)
    if params_fn is not None:
        state = state.replace(params=params_fn(state.params))
    step = build_train_step(cfg, rules, st)
    rows, params = [], []
    for i in range(steps):
        state, metrics = step(state, batch_fn(cfg, i, rules))
        rows.append({**jax.device_get(metrics), **live_arrays_stats()})
        params.append(jax.tree.map(np.array, state.params))  # a copy: np.asarray would keep the device array alive
    return rows, params, state, st


@pytest.fixture(scope="module")
def fp32_losses():
    rows, _, _, _ = train_losses(preset("single", *SMALL, "precision.mode=fp32"), TRACK_STEPS)
    return np.array([float(r["loss"]) for r in rows])


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_low_precision_tracks_fp32(mode, fp32_losses):
    rows, _, _, st = train_losses(preset("single", *SMALL, f"precision.mode={mode}"), TRACK_STEPS)
    losses = np.array([float(r["loss"]) for r in rows])
    assert st.policy.compute_dtype == mp.MODE_DTYPES[mode]
    assert fp32_losses[-1] < fp32_losses[0] - 1.0, "the reference run did not train"
    np.testing.assert_allclose(losses, fp32_losses, atol=TRACK_BOUND, rtol=0)
    assert np.abs(losses - fp32_losses).max() > 0, "the low-precision run is the fp32 run: the mode was ignored"
    cfg = preset("single", *SMALL, f"precision.mode={mode}")
    rules, st2 = setup(cfg)
    dots = primitive_dtypes(jax.make_jaxpr(build_grad_fn(cfg, rules, st2))(st2.abstract.params,
                                                                           synthetic_batch(cfg, 0)), "dot_general", 0)
    low = mp.MODE_DTYPES[mode]
    assert dots.get(low, 0) >= 0.75 * sum(dots.values()), dots  # projections (fp16: attention is fp32 on CPU)
    if mode == "fp16":
        assert int(rows[-1]["skipped_steps"]) == 0 and float(rows[-1]["loss_scale"]) == 2.0**15
    # the donated state is replaced, not accumulated: the live device arrays stay level (no leak)
    assert len({(r["live_arrays"], r["live_bytes"]) for r in rows[2:]}) == 1, [r["live_arrays"] for r in rows]


def overflow_at(step_index):
    """Batches as usual, except one token of batch `step_index` has weight 1e6: its scaled fp16 logit
    gradient (2^15 / tokens x 1e6) is far beyond fp16's 65504, so that step's gradients are inf."""
    def batch_fn(cfg, i, rules):
        batch = synthetic_batch(cfg, i)
        if i == step_index:
            batch["mask"] = batch["mask"].at[1, 5].set(1e6)
        return {k: jax.device_put(v, rules.batch_sharding()) for k, v in batch.items()}
    return batch_fn


def test_fp16_injected_overflow_skips_exactly_that_step_and_halves_the_scale():
    cfg = preset("single", *SMALL, "precision.mode=fp16", "precision.promote_after=0")
    rows, params, state, _ = train_losses(cfg, 4, overflow_at(1))
    assert [int(r["skipped_steps"]) for r in rows] == [0, 1, 1, 1]
    assert [float(r["loss_scale"]) for r in rows] == [2.0**15, 2.0**14, 2.0**14, 2.0**14]
    jax.tree.map(np.testing.assert_array_equal, params[1], params[0])  # step 2 changed nothing
    for before, after in ((params[0], params[2]), (params[2], params[3])):  # the others did
        assert not np.array_equal(before["lm_head"], after["lm_head"])
    assert int(state.step) == 4  # the skipped step still consumed its batch
    adam_count = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0 and x.dtype == jnp.int32]
    assert adam_count and all(int(c) == 3 for c in adam_count), "the optimizer saw 3 updates"
    counts = np.asarray(state.loss_scale.module_overflows)
    assert counts.sum() == 1 and counts[mp.MODULES.index("head")] == 1, dict(zip(mp.MODULES, counts))


def test_per_module_overrides_and_their_errors():
    devices = jax.devices()[:1]
    cfg = preset("single", "precision.mode=bf16", "precision.overrides=head:fp32,layers.w_*:fp32")
    policy = mp.resolve_policy(cfg, devices)
    assert policy.dtype_of("head") == jnp.float32 and policy.dtype_of("layers.w_up") == jnp.float32
    assert policy.dtype_of("layers.wq") == jnp.bfloat16 and policy.dtype_of("embed") == jnp.bfloat16
    auto = mp.resolve_policy(preset("single"), devices)
    assert auto.mode == "fp32" and "XLA:CPU" in auto.reason
    with pytest.raises(UserError, match="precision.overrides.*'router'.*matches no module"):
        mp.resolve_policy(preset("single", "precision.overrides=router:fp32"), devices)
    for override, field in (("precision.mode=fp8", "precision.mode"), ("precision.overrides=head:int8",
                            "precision.overrides"), ("precision.matmul=tf32", "precision.matmul"),
                            ("precision.policy_file=/nonexistent.yaml", "precision.policy_file")):
        with pytest.raises(UserError, match=f"'{field}'"):
            validate(preset("single", override), 1)
    with pytest.raises(UserError, match="'train.dtype' = 'bfloat16' contradicts precision.mode = 'fp16'"):
        validate(preset("single", "train.dtype=bfloat16", "precision.mode=fp16"), 1)


@pytest.mark.slow
def test_repeated_overflow_promotes_the_module_and_resume_keeps_it(tmp_path, capsys):
    """A loss scale of 2^40 overflows the LM head's fp16 weight gradient every step: after 2 overflows the
    head runs in fp32. The counts are in the checkpoint, so a resumed run starts with the promotion."""
    run = tmp_path / "run"
    common = ["--config", str(MESHES / "single.yaml"), "--run-dir", str(run), *SMALL, "train.seq_len=32",
              "precision.mode=fp16", "precision.loss_scale_init=1.1e12", "precision.promote_after=2",
              "logging.every=1", "checkpoint.every=3", "optimizer.warmup_steps=1"]
    assert main(["train", *common, "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "promoted to fp32 after 2+ fp16 overflows: head (2)" in out, out
    assert main(["train", *common, "train.steps=4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "promoted to fp32 after 2+ fp16 overflows: head" in out, out


def ill_conditioned(params):
    """The final norm's gain x100 and the LM head / 100: the same logits and the same gradients everywhere
    else, but the head's weight gradient, a sum over tokens of h x dlogits, is 100x larger: in fp16 with
    the loss scale 2^15 it exceeds 65504, while its input and its output gradient stay small."""
    return {**params, "final_norm": params["final_norm"] * 100.0, "lm_head": params["lm_head"] / 100.0}


def test_analysis_keeps_an_ill_conditioned_head_in_fp32_and_that_policy_trains_without_overflow(tmp_path):
    # a small learning rate keeps the 100x-smaller head weights in the same regime for the 3 steps
    cfg = preset("single", *SMALL, "precision.mode=fp16", "precision.promote_after=0", "optimizer.lr=3e-5")
    rules, st = setup(cfg)
    params = ill_conditioned(init_params(cfg, st))
    reports = analyze(cfg, rules, st, params, [synthetic_batch(cfg, 0, rules)], ["fp16"], ["head", "layers.w_down"])
    assert {r.module: r.needs_fp32 for r in reports} == {"head": True, "layers.w_down": False}
    head = reports[0]
    assert head.overflow and head.max_scaled_grad > 65504, head
    assert all(r.out_rel_err < 0.01 and r.grad_rel_err < 0.01 for r in reports[1:]), reports
    policy_file = tmp_path / "policy.yaml"
    write_policy(str(policy_file), "fp16", reports)

    plain, _, _, _ = train_losses(cfg, 3, params_fn=ill_conditioned)
    assert int(plain[-1]["skipped_steps"]) >= 1  # plain fp16 overflows
    guided_cfg = preset("single", *SMALL, "precision.mode=auto", f"precision.policy_file={policy_file}",
                        "optimizer.lr=3e-5")
    guided, params, _, st = train_losses(guided_cfg, 3, params_fn=ill_conditioned)
    assert st.policy.mode == "fp16" and st.policy.dtype_of("head") == jnp.float32
    assert st.policy.dtype_of("layers.w_down") == jnp.float16
    assert [int(r["skipped_steps"]) for r in guided] == [0, 0, 0]
    assert all(np.isfinite(float(r["loss"])) for r in guided)
    assert not np.array_equal(params[0]["lm_head"], params[2]["lm_head"])  # every step updated the weights
