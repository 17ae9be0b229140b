"""The fault injector: every fault it promises is in effect at the configured step, and logged as such."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import picotron_jax as pj
from helpers import MESHES, ROOT
from picotron_jax.config import FaultsConfig
from picotron_jax.train.faults import InStepFaults
from picotron_jax.train.step import make_grad_fn
from test_api import TINY, params_of, tiny


def losses(rows):
    return [r["loss"] for r in rows if r["kind"] == "train"]


def faults_log(run_dir):
    return [json.loads(line) for line in (run_dir / "faults.jsonl").read_text().splitlines()]


def test_nan_in_a_layers_forward_stops_the_run_at_that_step(tmp_path, capsys):
    trainer = pj.Trainer(tiny("single", "train.steps=4", "logging.every=1", "faults.nan_step=3",
                              "faults.nan_layer=1"), tmp_path)
    with pytest.raises(pj.RunAborted, match="loss became nan at step 3"):
        trainer.run()
    assert [np.isfinite(x) for x in losses(trainer.history)] == [True, True, False]
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert "fault injected at step 3: NaN in decoder layer 1's output" in capsys.readouterr().out
    assert faults_log(tmp_path) == [{"step": 3, "fault": "NaN in decoder layer 1's output", "process": 0}]


def test_nan_in_a_layers_gradient_poisons_that_layer_and_those_below_only():
    cfg = tiny("single", "model.num_layers=3", "faults.nan_step=2", "faults.nan_layer=1", "faults.nan_site=gradient",
               "monitor.on_nan=log")  # the monitor would stop the run at the non-finite gradient of step 2
    trainer = pj.Trainer(cfg)
    grads_fn = jax.jit(make_grad_fn(cfg, trainer.built.rules, trainer.built.setup))
    batch = trainer.batch(0)
    metrics, grads = grads_fn(trainer.params, batch, None, np.array([1, 0], np.int32))
    assert np.isfinite(float(metrics["loss"]))  # the forward is clean
    for name, g in grads["layers"].items():
        per_layer = np.isfinite(np.asarray(g)).reshape(3, -1).all(-1).tolist()
        assert per_layer == [False, False, True], (name, per_layer)  # layers 0 and 1 receive the NaN
    assert not np.isfinite(np.asarray(grads["embed"])).all() and np.isfinite(np.asarray(grads["lm_head"])).all()
    _, clean = grads_fn(trainer.params, batch, None, np.array([0, 0], np.int32))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(clean))
    row1, row2 = trainer.step(), trainer.step()
    assert np.isfinite(row1["grad_norm"]) and np.isfinite(row2["loss"]) and not np.isfinite(row2["grad_norm"])


def test_transient_faults_fire_once_and_reproducible_ones_every_time():
    once = InStepFaults(FaultsConfig(nan_step=3, transient=True))
    always = InStepFaults(FaultsConfig(spike_step=3))
    assert [once.flags(s)[0] for s in (1, 2, 3, 3, 4)] == [0, 0, 1, 0, 0]  # step 3 replayed: no fault
    assert [always.flags(s)[1] for s in (2, 3, 3)] == [0, 1, 1]
    assert always.due(3) == [(1, "loss spike: the batch's tokens replaced by uniform noise")] and once.due(3) == []


def test_loss_spikes_by_noise_and_by_learning_rate_hit_exactly_their_step():
    base = ["train.steps=4", "logging.every=1", "optimizer.warmup_steps=0", "optimizer.grad_clip=0"]
    clean = pj.Trainer(tiny("single", *base))
    clean_rows = [clean.step(), clean.step()]
    p2 = params_of(clean)
    clean_rows.append(clean.step())
    p3 = params_of(clean)
    noise = pj.Trainer(tiny("single", *base, "faults.spike_step=3"))
    noise_rows = [noise.step() for _ in range(3)]
    assert losses(noise_rows)[:2] == losses(clean_rows)[:2]
    # uniform noise targets cost at least ln V nats for any model (Jensen); the clean batch costs less
    assert noise_rows[2]["loss"] > np.log(256) - 0.01 and noise_rows[2]["loss"] > clean_rows[2]["loss"] + 0.1
    scaled = pj.Trainer(tiny("single", *base, "faults.spike_step=3", "faults.spike_kind=lr",
                             "faults.spike_lr_scale=10"))
    scaled.step(), scaled.step()
    s2 = params_of(scaled)
    for a, b in zip(s2, p2, strict=True):  # another program (x1.0 on the update): f32 close, not bitwise
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    scaled.step()
    for s3, b, c3, c2 in zip(params_of(scaled), s2, p3, p2):
        np.testing.assert_allclose(s3 - b, 10 * (c3 - c2), rtol=1e-3, atol=2e-6)  # x10 (norm weights ~1: f32 ulps)


def test_sleeps_and_slow_reads_take_their_time(tmp_path, capsys):
    trainer = pj.Trainer(tiny("single", "train.steps=3", "faults.sleep_step=2", "faults.sleep_s=0.6",
                              "faults.slow_read_s=0.3"), tmp_path)
    read = trainer.callbacks.wrap_batches(trainer.built.batch)
    t0 = time.perf_counter()
    read(0)
    assert time.perf_counter() - t0 >= 0.3
    trainer.step()
    t0 = time.perf_counter()
    trainer.step()  # step 2 sleeps before it is dispatched
    assert time.perf_counter() - t0 >= 0.6 + 0.3
    assert "fault injected at step 2: process 0 sleeps 0.6s before the step" in capsys.readouterr().out


def test_a_late_device_makes_the_next_step_wait_on_the_device_not_the_host(tmp_path):
    """The late copy is queued behind the running step (on_step_dispatched): the host dispatches on at once and
    the wait shows in the step (the clock's device time). Queued after a wait for the step, XLA:CPU would run
    its host callback inline and the sleep would stall the host instead (the profiler's straggler then vanishes)."""
    trainer = pj.Trainer(tiny("single", "mesh.num_devices=2", "mesh.data=2", "train.steps=4", "logging.every=1",
                              "faults.sleep_step=2", "faults.sleep_steps=2", "faults.sleep_s=0.5",
                              "faults.sleep_phase=device", "faults.device=1"), tmp_path)
    trainer.run()
    trainer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if r.get("kind") == "train" and r["step"] in (2, 3)]
    assert len(late) == 2
    for r in late:  # steps 2 and 3 start 0.5 s late on device 1
        assert r["time_device_s"] >= 0.45 and r["time_host_s"] < 0.2, r


def test_one_ulp_flip_on_one_data_parallel_replica():
    trainer = pj.Trainer(tiny("single", "mesh.num_devices=2", "mesh.data=2", "train.steps=2", "faults.flip_step=1",
                              "faults.flip_array=layers.wq", "faults.flip_replica=1"))
    trainer.step()
    shards = [np.asarray(s.data) for s in trainer.params["layers"]["wq"].addressable_shards]
    assert len(shards) == 2 and shards[0].ravel()[0] != shards[1].ravel()[0]
    assert np.nextafter(shards[0].ravel()[0], np.inf if shards[0].ravel()[0] <= 0 else -np.inf,
                        dtype=np.float32) == shards[1].ravel()[0]
    np.testing.assert_array_equal(shards[0].ravel()[1:], shards[1].ravel()[1:])


def test_a_hung_process_stops_at_its_step_and_says_so(tmp_path):
    args = [sys.executable, "-m", "picotron_jax", "train", "--config", str(MESHES / "single.yaml"), "--run-dir",
            str(tmp_path), *TINY, "train.steps=5", "logging.every=1", "faults.hang_step=3"]
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1",
           "HOME": str(tmp_path)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killer = threading.Timer(240, proc.kill)
    killer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "hangs" in line:
                break
        time.sleep(2)
        assert proc.poll() is None, "".join(lines)  # still there, not progressing
    finally:
        proc.kill()
        killer.cancel()
        proc.wait()
    out = "".join(lines)
    assert "fault injected at step 3: process 0 hangs" in out and "step 2/5" in out and "step 3/5" not in out
