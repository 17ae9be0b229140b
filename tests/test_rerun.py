"""`monitor.on_nan=rerun` / `monitor.on_spike=rerun` (observe/rerun.py): the suspicious step runs again
from the newest checkpoint on the same batch; the same bits mean the data or the model, others a
transient fault of the machine. Faults come from the fault injector (a `faults.transient` one fires once)."""
import json

import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.errors import RunAborted
from picotron_jax.observe.rerun import PendingRerun, verdict
from test_api import tiny

CKPT = ("checkpoint.every=3", "checkpoint.async_save=false", "logging.every=1", "monitor.throughput_drop=0")


def alerts_of(run_dir):
    return [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]


def test_the_verdict_compares_bits():
    pending = PendingRerun(step=5, kind="nan", loss=float("nan"), grad_norm=float("nan"), from_step=3)
    assert verdict(pending, float("nan"), float("nan"))[0]
    assert not verdict(pending, 4.25, 1.5)[0]
    spike = PendingRerun(step=5, kind="loss_spike", loss=5.5, grad_norm=2.0, from_step=3)
    assert verdict(spike, 5.5, 2.0)[0] and not verdict(spike, 5.5, np.nextafter(2.0, 3.0))[0]


@pytest.mark.slow  # default suite under 20 minutes
def test_a_one_off_nan_is_classified_transient_and_the_run_goes_on_with_the_rerun_values(tmp_path):
    trainer = pj.Trainer(tiny("single", *CKPT, "train.steps=7", "faults.nan_step=5", "faults.transient=true",
                              "monitor.on_nan=rerun"), tmp_path)
    summary = trainer.run()
    trainer.close()
    rows = alerts_of(tmp_path)
    assert [(r["step"], r["kind"], r["action"]) for r in rows] == [(5, "nan", "rerun"), (5, "rerun", "log")]
    assert "from the checkpoint of step 3" in rows[1]["detail"] and "transient" in rows[1]["detail"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in metrics if r.get("kind") == "train"]  # steps 4 and 5 are logged again by the rerun
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 4, 5, 6, 7] and train[4]["loss"] is None  # NaN: null
    assert all(np.isfinite(r["loss"]) for r in train[5:])
    assert summary.steps >= 7


@pytest.mark.slow  # 14 steps, one restore
def test_a_noise_batch_spike_is_reproducible_and_alerted(tmp_path):
    # the noise batch of step 13 costs about ln(256) = 5.55 nats; the window (steps 5-12) sits near 4.8
    trainer = pj.Trainer(tiny("single", "train.steps=14", "checkpoint.every=10", "checkpoint.async_save=false",
                              "logging.every=1", "faults.spike_step=13", "monitor.window=8", "monitor.warmup=4",
                              "monitor.spike_mads=4", "monitor.spike_min_rel=0.1", "monitor.throughput_drop=0",
                              "monitor.on_spike=rerun"), tmp_path)
    trainer.run()
    trainer.close()
    rows = alerts_of(tmp_path)
    assert [(r["step"], r["kind"], r["action"]) for r in rows] == [(13, "loss_spike", "rerun"),
                                                                   (13, "rerun", "alert")]
    assert "reproducible" in rows[1]["detail"] and "checkpoint of step 10" in rows[1]["detail"]


def test_a_reproducible_nan_stops_the_run_and_says_so(tmp_path):
    trainer = pj.Trainer(tiny("single", *CKPT, "train.steps=7", "faults.nan_step=5", "monitor.on_nan=rerun"),
                         tmp_path)
    with pytest.raises(RunAborted, match="step 5's nan is reproducible"):
        trainer.run()
    trainer.close()
    assert [(r["step"], r["kind"], r["action"]) for r in alerts_of(tmp_path)] == [(5, "nan", "rerun"),
                                                                                (5, "rerun", "stop")]
