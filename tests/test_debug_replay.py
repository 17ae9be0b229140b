"""The debugger's replays: a NaN that first appears in the backward pass (the forward is finite) traced to
its layer by the run itself (`debug.nan_origin`), `debug replay` reproducing a recorded step bitwise, and
the layout bisect naming the first layer where a broken tensor-parallel MLP departs from one device."""

from __future__ import annotations

import json

import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.cli import main
from picotron_jax.debug.replay import compare_rows, compare_states
from test_api import tiny


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """4 steps saved every step; at step 4 the fault injector puts a NaN into the gradient that reaches decoder
    layer 0's output (the forward stays finite), and the run traces it itself before stopping. Step 4 is not
    logged (logging.every=3): the automatic mode reads its loss and gradient norm at the end of the step."""
    run_dir = tmp_path_factory.mktemp("nan-run")
    cfg = tiny("single", "train.steps=5", "logging.every=3", "checkpoint.every=1",
               "faults.nan_step=4", "faults.nan_layer=0", "faults.nan_site=gradient", "monitor.on_nan=stop",
               "debug.nan_origin=true")
    with pj.Trainer(cfg, run_dir) as trainer, pytest.raises(pj.RunAborted):
        trainer.run()
    return run_dir


@pytest.mark.slow
def test_a_gradient_nan_is_traced_by_the_run_to_the_backward_of_its_layer(nan_run):
    report = json.loads((nan_run / "debug" / "nan-4.json").read_text())
    assert report["step"] == 4 and report["checkpoint"] == 3
    origin = report["origin"]
    # the backward runs through layer 1 first: it stays finite; the NaN starts in layer 0's backward
    assert origin["direction"] == "backward" and origin["layer"] == 0, origin
    assert origin["source"].startswith("faults.py:") and origin["inputs"][-1]["finite"] == 0.0
    assert report["report"].startswith("first non-finite value: select_n in backward pass, decoder layer 0,")


@pytest.mark.slow
def test_replay_reproduces_a_recorded_step_bitwise(nan_run, capsys):
    """Step 3 replayed from checkpoint 2 equals its metrics row and checkpoint 3 bit for bit."""
    capsys.readouterr()
    assert main(["debug", "replay", str(nan_run), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "replaying step 3 from checkpoint 2 on batch 2" in out
    assert "step 3 replayed from checkpoint 2: bitwise identical to the recorded metrics row and checkpoint 3" in out
    assert main(["debug", "replay", str(nan_run), "--step", "1"]) == 2
    assert "has no checkpoint before step 1" in capsys.readouterr().err


def test_replay_names_the_first_value_that_differs():
    recorded = {"loss": 5.25, "grad_norm": 1.5, "lr": 1e-4, "z_loss": 0.0, "tokens": 128}
    assert compare_rows(dict(recorded), recorded) == []
    moved = {**recorded, "grad_norm": float(np.nextafter(np.float32(1.5), np.float32(2)))}
    assert compare_rows(moved, recorded) == ["grad_norm: replayed 1.5000001192092896, recorded 1.5"]
    a = {"params": {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}}
    b = {"params": {"w": np.zeros((2, 3), np.float32), "b": np.array([1, 1, 1.5], np.float32)}}
    assert compare_states(a, a) == []
    assert compare_states(a, b) == ["params.b: 1 of 3 elements differ, max |difference| 0.5"]


def _mlp_without_its_reduction(original):
    """A test-only broken tensor-parallel MLP: the row-parallel w_down's all-reduce over `tensor` is dropped
    (each device keeps its own partial sum), as a shard_map with a missing psum would."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from picotron_jax.models import llama

    def broken(p, x_BTD, cfg, ops, norm_dtypes=None):
        rules = getattr(ops, "rules", None)
        if rules is None or rules.mesh.shape["tensor"] == 1:
            return original(p, x_BTD, cfg, ops, norm_dtypes)
        h_BTD = llama.rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps, None)
        act_BTF = jax.nn.silu(llama.project("btd,df->btf", h_BTD, p["w_gate"])) * llama.project(
            "btd,df->btf", h_BTD, p["w_up"])
        partial = jax.shard_map(lambda a_BTF, w_FD: jnp.einsum("btf,fd->btd", a_BTF, w_FD), mesh=rules.mesh,
                                in_specs=(P(None, None, "tensor"), P("tensor", None)), out_specs=P(), check_vma=False)
        return x_BTD + partial(act_BTF, p["w_down"])

    return broken


@pytest.mark.slow
def test_bisect_finds_no_divergence_on_a_correct_layout_and_the_first_layer_on_a_broken_one(monkeypatch, capsys):
    from picotron_jax.debug.bisect import bisect
    from picotron_jax.models import llama
    from test_api import TINY

    assert main(["debug", "bisect", "--config", "single", "--against", "tp2-dp4", *TINY]) == 0
    assert "no divergence: every layer output, the loss and every gradient agree" in capsys.readouterr().out
    monkeypatch.setattr(llama, "dense_mlp_residual", _mlp_without_its_reduction(llama.dense_mlp_residual))
    found = bisect(tiny("single"), tiny("tp2-dp4"), say=lambda _: None)
    assert found is not None and found.what == "forward: decoder layer 0 output", found
    assert found.describe().startswith("first divergence: forward: decoder layer 0 output: max |difference| ")
    assert found.axes == [("data", 4, False), ("tensor", 2, True)]  # the tensor split alone reproduces it
    assert "layout A with one mesh axis of layout B: mesh.data = 4: agrees; mesh.tensor = 2: diverges" in \
        found.describe()
    with pytest.raises(pj.UserError, match="config field 'model.num_layers' differs between the two configs"):
        bisect(tiny("single"), tiny("tp2-dp4", "model.num_layers=1"))
    with pytest.raises(pj.UserError, match="config field 'mesh.pipe' = 2"):
        bisect(tiny("single"), tiny("pp2-afab", "train.grad_accum=1"))


def test_a_replay_report_says_what_was_compared_and_lists_each_difference():
    from picotron_jax.debug.replay import Replay

    same = Replay(3, 2, ["metrics row", "checkpoint 3"])
    assert same.identical and same.describe() == ("step 3 replayed from checkpoint 2: bitwise identical to the "
                                                  "recorded metrics row and checkpoint 3")
    moved = Replay(3, 2, ["metrics row"], ["loss: replayed 5.0, recorded 5.5"])
    assert not moved.identical and moved.describe() == ("step 3 replayed from checkpoint 2: differs from the recorded "
                                                        "metrics row\n  loss: replayed 5.0, recorded 5.5")
    assert "nothing recorded to compare with" in Replay(3, 2).describe()
