"""Engine review (issue 13): each test here failed before its fix."""

from __future__ import annotations

import pytest

from helpers import preset
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.run import build_run


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
