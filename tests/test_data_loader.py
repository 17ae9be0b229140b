"""Placing batches on the mesh: process-local rows, make_array_from_process_local_data, prefetch.

Single process with 8 CPU devices, simulated multi-host row splits, and one real two-process
run (jax.distributed on CPU, 4 devices each) that checks every shard of every global array.
"""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from picotron_jax.config import MESH_AXES, DataConfig
from picotron_jax.data import TokenDataset, global_batch, prefetch, process_rows, rows_by_process

REPO = Path(__file__).resolve().parents[1]
BATCH = P(("data", "expert"))


def mesh(pipe=1, data=1, context=1, expert=1, tensor=1, order=None) -> Mesh:
    devices = np.array(jax.devices())[order if order is not None else slice(None)]
    return Mesh(devices.reshape(pipe, data, context, expert, tensor), MESH_AXES)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> TokenDataset:
    tmp = tmp_path_factory.mktemp("loader")
    (tmp / "c.txt").write_text("".join(chr(ord("a") + (i * 7) % 26) for i in range(5000)))
    return TokenDataset.build(DataConfig(source=str(tmp / "c.txt"), cache_dir=str(tmp / "cache")), 16, 0)


def assert_shards_match(arrays: dict, full: dict) -> None:
    """Every device holds exactly its slice of the full host batch."""
    for key, arr in arrays.items():
        assert arr.shape == full[key].shape and arr.dtype == full[key].dtype
        for shard in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[key][shard.index])
        np.testing.assert_array_equal(np.asarray(arr), full[key])


@pytest.mark.parametrize(
    "axes, spec",
    [
        (dict(data=4, tensor=2), BATCH),  # DP x TP: each row on the 2 devices of a tensor pair
        (dict(data=2, expert=2, tensor=2), BATCH),  # MoE: expert acts as more batch
        (dict(data=2, context=2, tensor=2), P(("data", "expert"), "context")),  # sequence split too
        (dict(data=8), BATCH),
        (dict(tensor=8), P()),  # fully replicated
    ],
)
def test_global_batch_equals_full_batch(ds, axes, spec):
    sharding = NamedSharding(mesh(**axes), spec)
    np.testing.assert_array_equal(process_rows(sharding, (16, ds.seq_len)), np.arange(16))  # one process: all
    for step in (0, 3):
        out = global_batch(ds, step, 16, sharding)
        assert set(out) == {"inputs", "targets", "mask"}
        assert all(a.sharding == sharding for a in out.values())
        assert_shards_match(out, ds.batch_rows(step, 16, slice(None)))


def test_global_batch_with_grad_accum_microbatches(ds):
    sharding = NamedSharding(mesh(data=4, tensor=2), P(None, ("data", "expert")))
    out = global_batch(ds, 2, 16, sharding, grad_accum=2)
    full = {k: v.reshape(2, 8, ds.seq_len) for k, v in ds.batch_rows(2, 16, slice(None)).items()}
    assert_shards_match(out, full)


def test_global_batch_error_on_indivisible_accum(ds):
    from picotron_jax.errors import UserError

    with pytest.raises(UserError, match="multiple of train.grad_accum = 3"):
        global_batch(ds, 0, 16, NamedSharding(mesh(data=8), BATCH), grad_accum=3)


def cover_check(by_proc: dict, n: int) -> None:
    rows = np.concatenate(list(by_proc.values()))
    assert sorted(rows) == list(range(n)), "rows overlap or miss some"


@pytest.mark.parametrize("num_procs", [2, 4])
@pytest.mark.parametrize("axes", [dict(data=4, tensor=2), dict(data=2, expert=2, tensor=2), dict(data=8)])
def test_simulated_hosts_split_rows_disjointly_and_cover_the_batch(axes, num_procs):
    sharding = NamedSharding(mesh(**axes), BATCH)
    index_map = sharding.devices_indices_map((32, 16))
    by_proc = rows_by_process(index_map, lambda d: d.id // (8 // num_procs), (32, 16))
    assert list(by_proc) == list(range(num_procs))
    assert all(len(r) == 32 // num_procs for r in by_proc.values())
    cover_check(by_proc, 32)


def test_simulated_hosts_with_interleaved_devices_get_non_contiguous_rows():
    # process 0 owns data shards 0 and 2, process 1 owns 1 and 3
    sharding = NamedSharding(mesh(data=4, tensor=2, order=[0, 1, 4, 5, 2, 3, 6, 7]), BATCH)
    by_proc = rows_by_process(sharding.devices_indices_map((8, 4)), lambda d: d.id // 4, (8, 4))
    np.testing.assert_array_equal(by_proc[0], [0, 1, 4, 5])
    np.testing.assert_array_equal(by_proc[1], [2, 3, 6, 7])


def test_simulated_hosts_that_are_tensor_replicas_read_the_same_rows():
    # 8 single-device processes: the two devices of a tensor pair hold the same rows
    sharding = NamedSharding(mesh(data=4, tensor=2), BATCH)
    by_proc = rows_by_process(sharding.devices_indices_map((8, 4)), lambda d: d.id, (8, 4))
    for p in range(0, 8, 2):
        np.testing.assert_array_equal(by_proc[p], by_proc[p + 1])
        np.testing.assert_array_equal(by_proc[p], [p, p + 1])
    by_seq = rows_by_process(NamedSharding(mesh(data=2, context=2, tensor=2), P(("data", "expert"), "context"))
                             .devices_indices_map((8, 4)), lambda d: d.id // 2, (8, 4), dim=1)
    np.testing.assert_array_equal(by_seq[0], [0, 1])
    np.testing.assert_array_equal(by_seq[1], [2, 3])


# ----------------------------------------------------------------------- real two-process run

WORKER = textwrap.dedent(
    """
    import os, sys
    pid, port, src, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax, numpy as np
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from picotron_jax.config import MESH_AXES, DataConfig
    from picotron_jax.data import TokenDataset, global_batch, process_rows

    assert jax.process_count() == 2 and jax.device_count() == 8
    ds = TokenDataset.build(DataConfig(source=src, cache_dir=cache), 16, 0)  # both build at once: atomic
    devs = np.array(jax.devices())  # process 0: devs[:4], process 1: devs[4:]
    B = ("data", "expert")
    cases = [  # (mesh shape, device order, spec, grad_accum, rows this process must read)
        ((1, 4, 1, 1, 2), range(8), P(B), 1, {0: range(0, 8), 1: range(8, 16)}),
        ((1, 4, 1, 1, 2), [0, 1, 4, 5, 2, 3, 6, 7], P(B), 1,
         {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}),  # interleaved hosts
        ((1, 4, 1, 1, 2), [0, 4, 1, 5, 2, 6, 3, 7], P(B), 1, {0: range(16), 1: range(16)}),  # tensor pair spans hosts
        ((1, 2, 2, 1, 2), [0, 1, 4, 5, 2, 3, 6, 7], P(B, "context"), 1, {0: range(16), 1: range(16)}),  # seq split
        ((1, 4, 1, 1, 2), range(8), P(None, B), 2, {0: range(16), 1: range(16)}),
    ]
    for shape, order, spec, accum, rows in cases:
        sharding = NamedSharding(Mesh(devs[list(order)].reshape(shape), MESH_AXES), spec)
        gshape = (16, 16) if accum == 1 else (accum, 16 // accum, 16)
        if accum == 1:
            got = process_rows(sharding, gshape)
            assert list(got) == list(rows[pid]), (shape, order, spec, list(got))
        for step in (0, 5):
            out = global_batch(ds, step, 16, sharding, grad_accum=accum)
            full = ds.batch_rows(step, 16, slice(None))
            for key, arr in out.items():
                assert arr.shape == gshape and arr.sharding == sharding
                want = full[key].reshape(gshape)
                for shard in arr.addressable_shards:
                    np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    print("OK", pid)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_real_processes_load_their_rows(tmp_path):
    (tmp_path / "c.txt").write_text("".join(chr(ord("a") + (i * 5) % 26) for i in range(3000)))
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    port = str(free_port())
    args = [str(tmp_path / "c.txt"), str(tmp_path / "cache")]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(i), port, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".bin", ".json"]


# ------------------------------------------------------------------------------------ prefetch


def test_prefetch_keeps_order_and_runs_ahead():
    produced = []

    def gen():
        for i in range(10):
            produced.append(i)
            yield i

    it = prefetch(gen(), size=2)
    assert next(it) == 0
    deadline = time.time() + 5
    while len(produced) < 3 and time.time() < deadline:  # 1 handed out + 2 queued
        time.sleep(0.01)
    assert len(produced) >= 3
    assert list(it) == list(range(1, 10))


def test_prefetch_reraises_producer_errors():
    def gen():
        yield 1
        raise ValueError("broken shard")

    it = prefetch(gen())
    assert next(it) == 1
    with pytest.raises(ValueError, match="broken shard"):
        next(it)


def test_prefetch_stops_its_thread_when_the_consumer_leaves():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    for i in prefetch(endless(), size=3):
        if i == 5:
            break
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_prefetch_of_global_batches_matches_direct_calls(ds):
    sharding = NamedSharding(mesh(data=4, tensor=2), BATCH)
    batches = prefetch(global_batch(ds, s, 8, sharding) for s in range(4, 8))
    for step, batch in zip(range(4, 8), batches):
        np.testing.assert_array_equal(np.asarray(batch["inputs"]), ds.batch_rows(step, 8, slice(None))["inputs"])
