"""`monitor.on_spike=skip`: spikes judged inside the jitted step (train/spike_guard.py) with the monitor's
robust rule; the spiky update is never applied and the windows are checkpointed with the train state."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.config import MonitorConfig
from picotron_jax.errors import UserError
from picotron_jax.observe.monitor import RobustWindow
from picotron_jax.train import spike_guard
from test_api import params_of, tiny

# the noise batch of step 13 costs about ln(256) = 5.55 nats; the window (steps 5-12) sits near 4.8
SPIKY = ("train.steps=16", "logging.every=1", "monitor.window=8", "monitor.warmup=4", "monitor.spike_mads=4",
         "monitor.spike_min_rel=0.1", "monitor.throughput_drop=0", "monitor.on_spike=skip")


def test_the_in_step_rule_equals_the_host_window_on_a_sequence_with_spikes():
    m = MonitorConfig(window=8, warmup=3, spike_mads=4.0, spike_min_rel=0.1, grad_spike_min_rel=3.0)
    rng = np.random.default_rng(0)
    losses = 4.0 - 0.02 * np.arange(40) + 0.01 * rng.standard_normal(40)
    losses[[15, 16, 30]] = [6.0, 5.9, 4.3]  # two spikes in a row, then a late one (4.3 vs ~3.4)
    host = RobustWindow(m.window, m.spike_mads, m.spike_min_rel)
    state = spike_guard.init_spike_state(m.window)
    judge = jax.jit(lambda st, i, x: spike_guard.judge(m, st, i, x, jnp.float32(1.0)))
    flagged_host, flagged_step = [], []
    for i, x in enumerate(losses.astype(np.float32)):
        limit = host.limit()
        if i + 1 > m.warmup and x > limit:
            flagged_host.append(i)
        else:
            host.values.append(float(x))
        state, spiky, metrics = judge(state, jnp.int32(i), jnp.float32(x))
        if bool(spiky):
            flagged_step.append(i)
        if np.isfinite(limit):
            np.testing.assert_allclose(float(metrics["spike_loss_limit"]), limit, rtol=1e-5)
    assert flagged_host == flagged_step == [15, 16, 30]
    assert int(state.skipped) == 3 and int(state.loss.count) == 37


@pytest.mark.slow  # default suite under 20 minutes
def test_a_late_loss_spike_is_skipped_inside_the_step_and_the_run_continues_as_one_that_skipped_that_step(tmp_path):
    """Step 13 trains on a noise batch: with on_spike=skip the parameters after it equal those before it
    (bitwise), the alert row says skip, and every later loss equals a run whose step 13 was skipped
    for another reason (a NaN gradient with on_nan=skip, the same program)."""
    both = ("faults.spike_step=13", "faults.nan_step=13")
    spiky = pj.Trainer(tiny("single", *SPIKY, both[0], "faults.nan_step=99"), tmp_path / "spike")
    other = pj.Trainer(tiny("single", *SPIKY, "faults.spike_step=99", both[1], "monitor.on_nan=skip"),
                       tmp_path / "nan")
    losses = {}
    for name, trainer in (("spike", spiky), ("nan", other)):
        rows = [trainer.step() for _ in range(12)]
        before = params_of(trainer)
        row = trainer.step()
        assert row["update_skipped"]
        for a, b in zip(params_of(trainer), before, strict=True):
            np.testing.assert_array_equal(a, b)
        rows += [row] + [trainer.step() for _ in range(3)]
        losses[name] = [r["loss"] for r in rows]
        trainer.close()
    assert losses["spike"][12] > 5.0  # the noise batch's loss was seen ...
    assert losses["spike"][13:] == losses["nan"][13:]  # ... and nothing of it was learned
    alerts = [json.loads(line) for line in (tmp_path / "spike" / "alerts.jsonl").read_text().splitlines()]
    assert [(a["step"], a["kind"], a["action"]) for a in alerts] == [(13, "loss_spike", "skip")]
    assert "in the train state" in alerts[0]["threshold"]


@pytest.mark.slow  # three runs of 16 steps
def test_the_windows_are_checkpointed_so_a_resumed_run_judges_and_trains_bitwise_alike(tmp_path):
    ckpt = ("checkpoint.every=10", "checkpoint.async_save=false")
    whole = pj.Trainer(tiny("single", *SPIKY, *ckpt, "faults.spike_step=13"), tmp_path / "whole")
    whole.run()
    whole.close()
    first = pj.Trainer(tiny("single", *SPIKY, *ckpt, "faults.spike_step=13", "train.stop_at_step=10"),
                       tmp_path / "parts")
    first.run()
    first.close()
    second = pj.Trainer(tiny("single", *SPIKY, *ckpt, "faults.spike_step=13"), tmp_path / "parts", resume=True)
    assert int(second.state.spike.loss.count) == 10  # steps 1-10 entered the loss window (restored)
    second.run()
    for a, b in zip(params_of(second), params_of(whole), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(second.state.spike.skipped) == int(whole.state.spike.skipped) == 1
    second.close()
    without = [o for o in SPIKY if o != "monitor.on_spike=skip"]
    with pytest.raises(UserError, match="monitor.on_spike=skip the spike windows"):
        pj.Trainer(tiny("single", *without, *ckpt), tmp_path / "parts", resume=True)


def test_skip_is_an_action_for_spikes_only_where_the_step_can_take_it():
    with pytest.raises(UserError, match="monitor.on_spike' = 'drop': valid actions are log, alert, skip, rewind"):
        tiny("single", "monitor.on_spike=drop").validate(1)
    tiny("single", "monitor.on_spike=skip").validate(1)
    assert not spike_guard.wanted(tiny("single", "monitor.on_spike=skip", "monitor.enabled=false"))


def test_the_host_windows_are_checkpointed_too(tmp_path):
    """With the other actions the monitor's own windows (observe/monitor.py) go into the checkpoint's
    callback states, so a resumed run's windows are the uninterrupted run's."""
    base = ("train.steps=8", "logging.every=1", "monitor.window=4", "checkpoint.every=6", "checkpoint.async_save=false")
    whole = pj.Trainer(tiny("single", *base, "train.stop_at_step=6"), tmp_path)
    whole.run()
    saved = [cb for cb in whole.callbacks if type(cb).__name__ == "Monitor"][0].state_dict()
    whole.close()
    assert len(saved["loss_window"]) == 4 and len(saved["grad_window"]) == 4
    resumed = pj.Trainer(tiny("single", *base), tmp_path, resume=True)
    assert [cb for cb in resumed.callbacks if type(cb).__name__ == "Monitor"][0].state_dict() == saved
    resumed.close()
