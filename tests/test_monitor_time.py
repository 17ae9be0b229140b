"""The step-time split and the goodput ledger (observe/step_time.py): a data-loader sleep injected through
the fault injector shows up as data wait, and the steps a killed session lost are wasted time when the run
resumes (the rewind's redone step and the classes summing to wall time: tests/test_monitor.py)."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.callback import Callback
from picotron_jax.observe.step_time import LEDGER_CLASSES, StepClock
from test_api import params_of, tiny


def clock_of(trainer) -> StepClock:
    return trainer.callbacks.callbacks[0].c


class CrashAt(Callback):
    """Raises at the end of step `step`: the run ends like a killed one (no final save)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, outputs):
        if step == self.step:
            raise RuntimeError(f"crash at step {step}")


def test_a_data_loader_sleep_is_data_wait_and_a_killed_sessions_lost_steps_are_wasted(tmp_path):
    # session 1: checkpoints at steps 4 and 8, the data loader sleeps 0.3 s for batches 5-9, a crash at step 9
    cfg = tiny("single", "train.steps=10", "logging.every=1", "checkpoint.every=4", "checkpoint.async_save=false",
               "faults.sleep_step=5", "faults.sleep_steps=5", "faults.sleep_s=0.3", "faults.sleep_phase=data",
               "monitor.throughput_drop=0")
    trainer = pj.Trainer(cfg, tmp_path, callbacks=[CrashAt(9)])
    with pytest.raises(RuntimeError, match="crash at step 9"):
        trainer.run()
    rows = [r for r in trainer.history if r["kind"] == "train"]
    # 1.5 s slept; the prefetch thread is at most 3 batches ahead at checkpoint 4, so >= 0.6 s of it is waited for
    assert sum(r["time_data_s"] for r in rows if 5 <= r["step"] <= 9) > 0.3
    trainer.close()
    saved = json.loads((tmp_path / "goodput.json").read_text())
    assert sorted(int(s) for s in saved["owned"]) == [9]  # checkpoint 8 was saved: step 9 is lost
    lost = sum(sum(v.values()) for v in saved["owned"].values())

    with pj.Trainer.restore(tmp_path) as resumed:
        assert resumed.step_count == 8
        resumed.run()
        clock = clock_of(resumed)
        assert clock.earlier["wasted"] == pytest.approx(lost, rel=1e-9) and lost > 0
        total = clock.total()
        assert set(total) == set(LEDGER_CLASSES)
        assert sum(total.values()) == pytest.approx(sum(saved["ledger"].values()) + sum(clock.ledger.values()))
        assert np.isfinite([r["loss"] for r in resumed.history]).all() and params_of(resumed)
    again = json.loads((tmp_path / "goodput.json").read_text())
    assert again["ledger"]["wasted"] == pytest.approx(lost, rel=1e-9)




def test_the_straggler_rule_names_the_slow_process_of_the_newest_step_every_process_wrote(tmp_path):
    from picotron_jax.observe.stragglers import find_straggler

    (tmp_path / "processes").mkdir()
    rows = {0: [(1, 0.01, 0.01), (2, 0.01, 0.02)], 1: [(1, 0.01, 0.01), (2, 0.4, 0.1)], 2: [(1, 0.02, 0.0)]}
    for p, own in rows.items():
        lines = [json.dumps({"step": s, "data_s": d, "device_s": 0.1, "host_s": h}) for s, d, h in own]
        (tmp_path / "processes" / f"{p}.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 3, "da')  # cut short
    assert find_straggler(tmp_path, 2, 3.0, 0.05, after=0) == (2, 1, pytest.approx(0.5), pytest.approx(0.03))
    assert find_straggler(tmp_path, 3, 3.0, 0.05, after=0)[:2] == (1, None)  # process 2 has only step 1: judged
    assert find_straggler(tmp_path, 3, 3.0, 0.05, after=1) is None  # nothing new every process wrote
    assert find_straggler(tmp_path, 2, 3.0, 1.0, after=0)[1] is None  # below straggler_min_s: noise


def test_the_device_time_a_callback_waits_for_is_charged_to_device_not_host():
    """The step is dispatched asynchronously; a later callback that reads its outputs (as the monitor does)
    must not be charged the device's time: the clock waits for the outputs first."""
    @jax.jit
    def slow(x_NN):  # a few hundred ms of matmuls on the CPU
        return jax.lax.fori_loop(0, 40, lambda _, y: jnp.tanh(y @ x_NN), x_NN).sum()

    x = jnp.ones((512, 512), jnp.float32) / 512
    slow(x).block_until_ready()  # compiled
    t0 = time.perf_counter()
    slow(x).block_until_ready()
    step_s = time.perf_counter() - t0
    clock = StepClock(None)
    clock.mark = time.perf_counter()
    clock.step = 1
    outputs = {"loss": slow(x)}  # dispatched, not finished
    clock.first.on_step_end(None, 1, outputs)
    jax.device_get(outputs)  # the monitor's read: nothing left to wait for
    clock.charge("host")
    assert clock.ledger["device"] >= 0.5 * step_s and clock.ledger["host"] < 0.25 * step_s, (clock.ledger, step_s)
