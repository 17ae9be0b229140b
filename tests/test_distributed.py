"""Several processes as one run, the pieces without JAX processes (in milliseconds): jax.distributed start-up
plans, the peer table, the watchdog threads and the local launcher's process handling (real 2-process runs:
tests/test_multiprocess.py)."""

from __future__ import annotations

import io
import json
import sys
import textwrap
import time
from contextlib import redirect_stderr

import psutil
import pytest

from picotron_jax.cli import main
from picotron_jax.config import DistributedConfig, load_config
from picotron_jax.distributed import EXIT_PEER_LOST, KEY_PREFIX, PeerTable, Watchdog, plan_init
from picotron_jax.errors import UserError
from picotron_jax.launch import child_env, launch


# ------------------------------------------------------------------------------- start-up plans


def test_a_plain_run_is_a_single_process():
    assert plan_init(DistributedConfig(), environ={}) is None
    one_task = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0"}
    assert plan_init(DistributedConfig(), environ=one_task) is None  # keeps all its GPUs


def test_clusters_and_explicit_fields_start_jax_distributed():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "3"}
    plan = plan_init(DistributedConfig(), environ=slurm)
    assert plan.method == "slurm" and plan.coordinator is None and plan.process_id is None  # JAX reads SLURM_*
    assert plan_init(DistributedConfig(), environ={"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234",
                                                   "OMPI_COMM_WORLD_SIZE": "4"}).method == "ompi"
    assert plan_init(DistributedConfig(cluster="off"), environ=slurm) is None
    explicit = DistributedConfig(coordinator="10.0.0.1:1234", num_processes=4, process_id=2, local_device_ids="0,1")
    plan = plan_init(explicit, environ={})
    assert (plan.method, plan.coordinator, plan.num_processes, plan.process_id, plan.local_device_ids) == (
        "deactivate", "10.0.0.1:1234", 4, 2, [0, 1])
    plan = plan_init(DistributedConfig(coordinator="n1:1234"), environ=slurm)  # SLURM fills in the rest
    assert plan.method == "slurm" and plan.coordinator == "n1:1234"
    assert plan_init(DistributedConfig(cluster="k8s"), environ={}).method is None  # JAX's own detection
    assert plan_init(DistributedConfig(), environ={}, on_cloud_tpu=True).source == "Cloud TPU"


@pytest.mark.parametrize("fields, message", [
    (dict(num_processes=2), "distributed.coordinator, distributed.process_id are not set"),
    (dict(coordinator="no-port"), "'distributed.coordinator' = 'no-port': must be host:port"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "'distributed.process_id' = 2: must be below"),
    (dict(local_device_ids="0,a"), "'distributed.local_device_ids' = '0,a'"),
    (dict(cluster="pbs"), "'distributed.cluster' = 'pbs': valid values are auto, off, slurm"),
    (dict(heartbeat_timeout_s=0), "'distributed.heartbeat_timeout_s' = 0: must be >= 1"),
])
def test_bad_distributed_config_is_a_user_error(fields, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_init(DistributedConfig(**fields), environ={})


def test_distributed_section_loads_from_overrides():
    cfg = load_config(None, ["distributed.coordinator=10.0.0.1:1234", "distributed.num_processes=2",
                             "distributed.local_device_ids=0,1,2,3", "distributed.heartbeat_timeout_s=30"])
    assert cfg.distributed.coordinator == "10.0.0.1:1234" and cfg.distributed.local_device_ids == "0,1,2,3"
    assert cfg.to_dict()["distributed"]["heartbeat_timeout_s"] == 30


# --------------------------------------------------------------------------------- peer table


def beat(n, step=None, state="running", error=""):
    return {"n": n, "step": step, "state": state, "error": error, "host": "h", "pid": 100}


def test_peer_table_names_a_silent_process_only_after_the_timeout():
    t = PeerTable(me=0, num_processes=3, timeout_s=10, step_timeout_s=0, now=0.0)
    t.update({0: beat(1), 1: beat(1, 4), 2: beat(1, 4)}, now=1.0)
    t.update({0: beat(2), 1: beat(2, 5), 2: beat(1, 4)}, now=9.0)  # process 2 stopped beating at t=1
    assert t.check(10.9) is None
    t.update({0: beat(3), 1: beat(3, 5), 2: beat(1, 4)}, now=11.0)
    problem = t.check(11.5)
    assert "process 2 of 3 (host h, pid 100) is lost: no heartbeat for 10.5 s" in problem
    assert "last seen at step 4" in problem


def test_peer_table_reports_failures_at_once_and_ignores_finished_processes():
    t = PeerTable(me=1, num_processes=3, timeout_s=10, step_timeout_s=0, now=0.0)
    t.update({0: beat(1, state="done"), 2: beat(1, 3, "failed", "OSError: disk full")}, now=0.5)
    assert t.check(0.6) == "process 2 of 3 (host h, pid 100) failed: OSError: disk full"
    t = PeerTable(me=1, num_processes=2, timeout_s=10, step_timeout_s=0, now=0.0)
    t.update({0: beat(1, 9, state="done")}, now=0.5)
    assert t.check(100.0) is not None  # the service itself went quiet ...
    t.update({0: beat(1, 9, state="done")}, now=100.0)
    assert t.check(100.5) is None  # ... but a finished process is never "lost"


def test_peer_table_times_out_a_silent_coordination_service():
    t = PeerTable(me=1, num_processes=2, timeout_s=5, step_timeout_s=0, now=0.0, coordinator="10.0.0.1:1234")
    t.update({0: beat(1)}, now=1.0)
    assert "no answer from the coordination service on process 0 (10.0.0.1:1234) for 6.5 s" in t.check(7.5)


def test_step_timeout_names_the_process_that_fell_behind():
    t = PeerTable(me=0, num_processes=3, timeout_s=100, step_timeout_s=20, now=0.0)
    t.progress(7, now=1.0)
    for k in range(1, 30):  # everyone keeps beating (alive), nobody finishes a step
        t.update({1: beat(k, 7), 2: beat(k, 5)}, now=float(k))
    assert t.check(20.0) is None
    problem = t.check(22.0)
    assert "no training step finished for 21.0 s (distributed.step_timeout_s = 20)" in problem
    assert "process 2 of 3 (host h, pid 100) stuck at step 5 while others reached step 7" in problem
    t.update({1: beat(40, 7), 2: beat(40, 7)}, now=22.0)
    assert "every process is stuck after step 7" in t.check(22.5)


# ------------------------------------------------------------------------ watchdog threads


class FakeKV:
    """The two coordination-service calls the watchdog uses, in memory; `down` makes them fail."""

    def __init__(self):
        self.store: dict[str, str] = {}
        self.down = False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: coordination service is gone")
        self.store[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: coordination service is gone")
        return [(k, v) for k, v in list(self.store.items()) if k.startswith(prefix)]


def two_watchdogs(kv, timeout_s=1.0):
    exits: dict[int, list] = {0: [], 1: []}
    dogs = [Watchdog(kv, me, 2, timeout_s, exit_fn=exits[me].append) for me in (0, 1)]
    for d in dogs:
        d.start()
    return dogs, exits


def wait_for(cond, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_watchdog_stops_the_survivor_when_a_process_goes_silent():
    kv = FakeKV()
    err = io.StringIO()
    with redirect_stderr(err):
        dogs, exits = two_watchdogs(kv)
        dogs[1].progress(3)
        time.sleep(0.5)
        dogs[1]._stop.set()  # process 1 "dies": its heartbeat stops, no final state
        t0 = time.monotonic()
        assert wait_for(lambda: exits[0], 5.0)
        took = time.monotonic() - t0
    assert exits[0] == [EXIT_PEER_LOST] and 0.8 < took < 3.0, took
    assert "process 1 of 2 (host" in err.getvalue() and "is lost: no heartbeat" in err.getvalue()
    assert "last seen at step 3" in err.getvalue()
    assert json.loads(kv.store[f"{KEY_PREFIX}0"])["state"] == "failed"  # tells any third process why


def test_watchdog_relays_a_failure_at_once_and_accepts_a_clean_finish():
    kv = FakeKV()
    err = io.StringIO()
    with redirect_stderr(err):
        dogs, exits = two_watchdogs(kv)
        time.sleep(0.3)
        dogs[1].stop("failed", "FloatingPointError: loss became nan at step 9")
        assert wait_for(lambda: exits[0], 1.0)
    assert "process 1 of 2" in err.getvalue() and "failed: FloatingPointError: loss became nan" in err.getvalue()

    kv = FakeKV()
    dogs, exits = two_watchdogs(kv)
    time.sleep(0.3)
    dogs[1].stop("done")
    time.sleep(2.0)  # twice the timeout: a finished process is not missed
    dogs[0].stop("done")
    assert exits == {0: [], 1: []}


def test_watchdog_gives_up_on_an_unreachable_coordination_service():
    kv = FakeKV()
    err = io.StringIO()
    with redirect_stderr(err):
        dogs, exits = two_watchdogs(kv)
        time.sleep(0.3)
        kv.down = True
        assert wait_for(lambda: exits[0] and exits[1], 5.0)
    assert err.getvalue().count("no answer from the coordination service") == 2


# ------------------------------------------------------------------- launcher, without JAX

def child_pids(text: str) -> list[int]:
    return [int(line.split("(pid ")[1].split(")")[0]) for line in text.splitlines()
            if line.startswith("launch: process") and "(pid " in line]


FAKE_CHILD = textwrap.dedent("""
    import os, sys, time
    pid = int([a for a in sys.argv if a.startswith("distributed.process_id=")][0].split("=")[1])
    print("child", pid, sys.argv[1:], os.environ["XLA_FLAGS"], flush=True)
    mode = sys.argv[1]
    if mode == "ok":
        sys.exit(0)
    if pid == 1:
        time.sleep(0.3)
        sys.exit(7)
    time.sleep(600)  # process 0 hangs: the launcher must kill it
""")


def test_child_env_sets_its_own_device_count():
    env = child_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"}, 4)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
    assert child_env({"XLA_FLAGS": "--a"}, 0)["XLA_FLAGS"] == "--a" and child_env({}, 2)["PYTHONUNBUFFERED"] == "1"


# the launcher forks with PR_SET_PDEATHSIG; JAX (imported by pytest, not by the launcher) warns about fork
FORK = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")


@FORK
def test_launcher_passes_the_run_layout_and_returns_success(tmp_path, capfd):
    code = launch(2, ["ok"], tmp_path, devices_per_process=3, program=[sys.executable, "-c", FAKE_CHILD], port=4242)
    assert code == 0
    out = capfd.readouterr().out
    assert "child 0 ['ok', 'distributed.coordinator=127.0.0.1:4242', 'distributed.num_processes=2', " \
           "'distributed.process_id=0'" in out
    assert "--xla_force_host_platform_device_count=3" in out
    assert "child 1" not in out and "child 1" in (tmp_path / "process-1.log").read_text()


@FORK
def test_launcher_returns_the_first_failure_and_kills_the_rest(tmp_path, capfd):
    t0 = time.monotonic()
    code = launch(2, ["fail"], tmp_path, grace_s=1.0, program=[sys.executable, "-c", FAKE_CHILD])
    assert code == 7 and time.monotonic() - t0 < 30
    err = capfd.readouterr().err
    assert "process 1 exited with code 7" in err and "killing process 0" in err
    assert "process 0 was killed by SIGKILL" in err and "failed: process 1 exited with code 7 first" in err
    pids = child_pids(err)
    assert len(pids) == 2 and not any(psutil.pid_exists(p) for p in pids)


def test_launch_without_a_command_is_a_user_error(capsys):
    assert main(["launch", "-n", "2"]) == 2
    assert "launch needs the command every process runs" in capsys.readouterr().err
