"""Engine review (issue 13): each test here failed before its fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from helpers import preset, primitive_dtypes, setup, synthetic_batch
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.run import build_run
from picotron_jax.train.step import build_grad_fn


def test_zero_refuses_a_data_axis_that_does_not_divide_hidden_size():
    """At data=6 ZeRO-3 used to leave every parameter unsplit while the banner said ZeRO-3."""
    cfg = preset("zero3-dp8", "mesh.data=6", "train.global_batch=12")
    with pytest.raises(UserError) as info:
        validate(cfg, 6)
    msg = str(info.value)
    assert "train.zero_stage" in msg and "128" in msg and "mesh.data = 6" in msg
    validate(preset("zero3-dp8", "mesh.data=6", "train.global_batch=12", "train.zero_stage=0"), 6)


def test_replicated_parameter_dimensions_are_reported():
    """A logical rule that cannot split a dimension says so (the banner prints these lines)."""
    run = build_run(preset("tp8"), data=False)
    lines = run.rules.unsplit_params(run.setup.spec.logical_axes, run.setup.spec.shapes)
    for name in ("wk", "wv"):
        assert f"layers.{name} dim 2 (kv_heads=4): tensor=8 does not divide it: parameter replicated on that axis" in lines
    assert not any("wq" in line for line in lines)
    zero3 = build_run(preset("zero3-dp8"), data=False)
    assert zero3.rules.unsplit_params(zero3.setup.spec.logical_axes, zero3.setup.spec.shapes) == []


def grad_jaxpr(cfg):
    rules, st = setup(cfg)
    return jax.make_jaxpr(build_grad_fn(cfg, rules, st))(st.abstract.params, synthetic_batch(cfg, 0)), st.policy


def test_norm_overrides_change_the_program_dtypes():
    """Norm overrides used to round only the scale (rms_norm computed in fp32 whatever the dtype) and
    final_norm was never cast: the jaxpr's rsqrt (one per norm; the scan body counts once) shows it."""
    fp32, _ = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=fp32"))
    assert primitive_dtypes(fp32, "rsqrt") == {"float32": 3}
    low, policy = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=fp32",
                                    "precision.overrides=layers.attn_norm:bf16,final_norm:bf16"))
    assert primitive_dtypes(low, "rsqrt") == {"bfloat16": 2, "float32": 1}  # attn_norm, final_norm; mlp_norm fp32
    assert policy.dtype_of("final_norm") == jnp.bfloat16 and policy.dtype_of("layers.mlp_norm") == jnp.float32


def test_norms_are_fp32_in_a_bf16_run_and_the_policy_says_so():
    """In bf16 the norms compute in fp32 (every rsqrt is f32), the policy reports fp32 for them, and an
    fp32 override of a norm is no change (it is not listed as one)."""
    bf16, policy = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=bf16"))
    assert set(primitive_dtypes(bf16, "rsqrt")) == {"float32"}
    assert policy.dtype_of("final_norm") == jnp.float32 and policy.dtype_of("layers.wq") == jnp.bfloat16
    assert "norms fp32" in policy.describe()
    _, same = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=bf16",
                                "precision.overrides=final_norm:fp32"))
    assert same.module_dtypes == ()
