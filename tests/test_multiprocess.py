"""Several processes as one run: jax.distributed start-up, the local launcher, failure handling.

Real runs use `picotron-jax launch -n 2 --devices-per-process 4` (what users run): 2 processes x 4 CPU
devices, gloo collectives over loopback, compared with 1 process x 8 devices (the pytest process, see
conftest.py). Start-up plans, the peer table, the watchdog threads and the launcher's process handling are
tested on their own, without JAX processes, in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from helpers import MESHES
from picotron_jax.cli import main
from picotron_jax.distributed import EXIT_PEER_LOST
from picotron_jax.launch import child_env
from test_distributed import child_pids

REPO = Path(__file__).resolve().parents[1]
# few steps, short sequences, a small corpus of our own: each 2-process run stays well under a minute
FAST = ["train.steps=4", "train.seq_len=32", "logging.every=1", "optimizer.warmup_steps=1", "optimizer.decay_steps=3",
        "logging.peak_flops=1e11", "logging.progress=false"]


# ------------------------------------------------------------------ real 2-process runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("corpus")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rng = np.random.default_rng(0)
    (tmp / "c.txt").write_text(" ".join(words[i] for i in rng.integers(0, len(words), 20000)))
    return [f"data.source={tmp / 'c.txt'}", f"data.cache_dir={tmp / 'cache'}"]


def run_launcher(args: list[str], log: Path, timeout_s: float = 150) -> tuple[int, str]:
    """`picotron-jax launch ...` as a subprocess; on timeout the launcher is killed (its children with it)."""
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "picotron_jax", "launch", *args], stdout=out,
                             stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            p.wait(timeout=timeout_s)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    text = log.read_text()
    assert p.returncode is not None
    return p.returncode, text


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def assert_same_losses(a: dict, b: dict, steps) -> None:
    for s in steps:
        np.testing.assert_allclose(a[s], b[s], rtol=1e-5, err_msg=f"step {s}")


def train_one_process(preset: str, run_dir: Path, *extra: str) -> None:
    assert main(["train", "--config", str(MESHES / f"{preset}.yaml"), "--run-dir", str(run_dir), *FAST, *extra]) == 0


def train_two_processes(preset: str, run_dir: Path, *extra: str) -> str:
    code, text = run_launcher(["-n", "2", "--devices-per-process", "4", "--", "train", "--config",
                               str(MESHES / f"{preset}.yaml"), "--run-dir", str(run_dir), *FAST, *extra],
                              run_dir.parent / f"{run_dir.name}.out")
    assert code == 0, text[-4000:]
    assert "distributed: process 0/2" in text and "4 local cpu device(s), 8 in total" in text
    assert "distributed: process 1/2" in (run_dir / "process-1.log").read_text()
    assert not any(psutil.pid_exists(p) for p in child_pids(text))
    return text


@pytest.mark.parametrize("preset", ["dp8", "tp2-dp4"])
def test_two_processes_train_like_one(preset, tmp_path, corpus):
    train_one_process(preset, tmp_path / "one", *corpus)
    # dp8: process 1 sleeps 0.5 s before steps 2 and 3 (a straggler: the monitor names it, the losses are unchanged)
    straggle = ["faults.process=1", "faults.sleep_step=2", "faults.sleep_steps=2", "faults.sleep_s=0.5"] * (
        preset == "dp8")
    text = train_two_processes(preset, tmp_path / "two", *corpus, *straggle)
    assert_same_losses(losses(tmp_path / "one"), losses(tmp_path / "two"), [1, 2, 3, 4])
    if straggle:
        alerts = [json.loads(line) for line in (tmp_path / "two" / "alerts.jsonl").read_text().splitlines()]
        (row,) = [r for r in alerts if r["kind"] == "straggler"]
        assert row["where"] == "process 1" and row["step"] in (2, 3) and row["action"] == "alert"
    assert text.count("step 4/4 | loss") == 1  # only process 0 prints ...
    assert "step 4/4" not in (tmp_path / "two" / "process-1.log").read_text()  # ... and writes metrics


def test_zero3_checkpoints_move_between_one_and_two_processes(tmp_path, corpus):
    """ZeRO-3 (parameters sharded over all 8 devices, so over both processes) trains like one process, and a
    checkpoint saved by 2 processes restores in 1 and vice versa, continuing with the same losses."""
    ckpt = [*corpus, "checkpoint.every=2"]
    train_one_process("zero3-dp8", tmp_path / "one", *ckpt)
    train_two_processes("zero3-dp8", tmp_path / "two", *ckpt)
    ref = losses(tmp_path / "one")
    assert_same_losses(ref, losses(tmp_path / "two"), [1, 2, 3, 4])

    def from_step_2(src: Path, dst: Path) -> None:  # a run directory holding only src's checkpoint 2
        shutil.copytree(src / "checkpoints" / "2", dst / "checkpoints" / "2")

    from_step_2(tmp_path / "two", tmp_path / "two_to_one")
    train_one_process("zero3-dp8", tmp_path / "two_to_one", *ckpt, "--resume")
    assert sorted(losses(tmp_path / "two_to_one")) == [3, 4]
    assert_same_losses(ref, losses(tmp_path / "two_to_one"), [3, 4])

    from_step_2(tmp_path / "one", tmp_path / "one_to_two")
    text = train_two_processes("zero3-dp8", tmp_path / "one_to_two", *ckpt, "--resume")
    assert "resumed from" in text and "at step 2" in text
    assert_same_losses(ref, losses(tmp_path / "one_to_two"), [3, 4])


def start_long_run(tmp_path: Path, corpus: list[str], heartbeat_s: int) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "launch.out"
    args = ["-n", "2", "--devices-per-process", "4", "--", "train", "--config", str(MESHES / "dp8.yaml"),
            "--run-dir", str(tmp_path / "run"), *FAST, *corpus, "train.steps=100000",
            f"distributed.heartbeat_timeout_s={heartbeat_s}"]
    out = open(log, "w")
    p = subprocess.Popen([sys.executable, "-m", "picotron_jax", "launch", *args], stdout=out,
                         stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    out.close()
    return p, log


def wait_for_steps(p: subprocess.Popen, log: Path, timeout_s: float = 150) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and p.poll() is None:
        text = log.read_text()
        if re.search(r"^step +2/100000 \| loss", text, re.M):
            return text
        time.sleep(0.2)
    raise AssertionError(f"training did not start:\n{log.read_text()[-4000:]}")


def test_killing_a_process_stops_the_other_within_the_heartbeat_timeout(tmp_path, corpus):
    heartbeat_s = 8
    p, log = start_long_run(tmp_path, corpus, heartbeat_s)
    try:
        text = wait_for_steps(p, log)
        pids = child_pids(text)
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        p.wait(timeout=heartbeat_s + 60)
        took = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    text = log.read_text()
    assert p.returncode == 128 + signal.SIGKILL, text[-3000:]  # the launcher returns the first failure
    assert "process 1 was killed by SIGKILL" in text
    assert (f"error: process 1 of 2 (host {os.uname().nodename}, pid {pids[1]}) is lost: no heartbeat for" in text
            and f"(distributed.heartbeat_timeout_s = {heartbeat_s})" in text), text[-3000:]
    assert f"process 0 exited with code {EXIT_PEER_LOST}" in text
    # heartbeat_timeout_s after process 1's last heartbeat (which may precede the kill by up to an interval),
    # plus one check interval and a loaded machine's scheduling
    assert heartbeat_s / 2 < took < heartbeat_s + 10, took
    assert not any(psutil.pid_exists(pid) for pid in pids)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_after_the_same_step_with_a_checkpoint(tmp_path, corpus):
    p, log = start_long_run(tmp_path, [*corpus, "checkpoint.every=100000"], 60)
    try:
        wait_for_steps(p, log)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    text = log.read_text()
    assert p.returncode == 130 and "process 0 exited with code 0" in text and "process 1 exited with code 0" in text
    stopped = int(text.split("done (stopped early by SIGTERM): ")[1].split(" steps")[0])
    assert [int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir()] == [stopped]


@pytest.mark.slow
def test_a_frozen_coordinator_stops_the_other_within_the_heartbeat_timeout(tmp_path, corpus):
    heartbeat_s = 8
    p, log = start_long_run(tmp_path, corpus, heartbeat_s)
    try:
        pids = child_pids(wait_for_steps(p, log))
        os.kill(pids[0], signal.SIGSTOP)  # process 0 and its coordination service freeze
        p.wait(timeout=heartbeat_s + 60)  # the launcher kills the frozen one after its grace period
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    text = log.read_text()
    assert p.returncode == EXIT_PEER_LOST and f"process 1 exited with code {EXIT_PEER_LOST}" in text, text[-3000:]
    assert "killing process 0" in text
    log1 = (tmp_path / "run" / "process-1.log").read_text()
    assert "no answer from the coordination service on process 0 (127.0.0.1:" in log1
    assert not any(psutil.pid_exists(pid) for pid in pids)


@pytest.mark.slow
def test_killing_the_coordinator_stops_the_other_at_once(tmp_path, corpus):
    p, log = start_long_run(tmp_path, corpus, 60)
    try:
        pids = child_pids(wait_for_steps(p, log))
        os.kill(pids[0], signal.SIGKILL)
        t_kill = time.monotonic()
        p.wait(timeout=60)
        took = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    assert p.returncode == 128 + signal.SIGKILL and took < 30, took  # JAX's own detection: no heartbeat wait
    assert "leader task was preempted/died" in (tmp_path / "run" / "process-1.log").read_text()


def train_two_processes_by_hand(tmp_path, args_of, devices_per_process: int = 4) -> list:
    """`picotron-jax train` on dp8 as two processes without the launcher (process i gets `args_of(i)` as extra
    overrides); waits for both (150 s at most) and returns them; their output is in tmp_path/p<i>.out."""
    from picotron_jax.launch import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    env = child_env(dict(os.environ), devices_per_process)
    procs, outs = [], []
    for i in range(2):
        out = open(tmp_path / f"p{i}.out", "w")
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "picotron_jax", "train", "--config", str(MESHES / "dp8.yaml"), "--run-dir",
             str(tmp_path / "run"), *FAST, *args_of(i), f"distributed.coordinator={coordinator}",
             "distributed.num_processes=2", f"distributed.process_id={i}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO))
    try:
        for p in procs:
            p.wait(timeout=150)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for out in outs:
            out.close()
    return procs


def test_an_error_in_one_process_stops_the_other_at_once_with_the_error(tmp_path, corpus):
    """Without the launcher: process 1 alone cannot read its data (a user error after start-up)."""
    procs = train_two_processes_by_hand(tmp_path, lambda i: [corpus[0] if i == 0 else "data.source=/nonexistent/corpus.txt",
                                                     corpus[1]])
    text0 = (tmp_path / "p0.out").read_text()
    assert procs[1].returncode == 2 and procs[0].returncode == EXIT_PEER_LOST, text0[-3000:]
    assert "process 1 of 2" in text0 and "failed: UserError:" in text0 and "nonexistent" in text0
