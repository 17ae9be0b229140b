"""The graders of lessons 10-15 (picotron_jax/tutorials/operations.py, scale.py): each lesson's reference
answer passes and at least three seeded wrong answers are rejected with the failed property named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from picotron_jax.tutorials import ExerciseFailed, Passed, operations
from test_tutorials import rejected


def spike_limit(values, mads, min_rel):
    if len(values) < 8:
        return math.inf
    v = np.asarray(values)
    med = np.median(v)
    return max(med + mads * 1.4826 * np.median(np.abs(v - med)), (1 + min_rel) * med)


def test_10_spike_threshold():
    from picotron_jax.observe.monitor import RobustWindow

    rng = np.random.default_rng(3)  # a falling noisy loss with one corrupted batch at step 13
    losses = list(5.5 - 0.06 * np.arange(1, 15) + 0.03 * rng.standard_normal(14))
    losses[12] = 6.0
    knobs = dict(window=8, warmup=4, mads=4.0, min_rel=0.1)
    window, flagged = RobustWindow(8, 4.0, 0.1), []
    for step, loss in enumerate(losses, 1):
        if step > 4 and loss > window.limit():
            flagged.append(step)
        else:
            window.values.append(loss)
    assert flagged == [13]
    assert isinstance(operations.check_spike_limit(spike_limit, losses, 13, **knobs), Passed)

    def std_rule(v, m, r):  # the standard deviation instead of the MAD
        return math.inf if len(v) < 8 else max(np.median(v) + m * np.std(v), (1 + r) * np.median(v))

    def no_sigma(v, m, r):  # MAD not scaled to a standard deviation
        return math.inf if len(v) < 8 else max(np.median(v) + m * np.median(np.abs(v - np.median(v))),
                                               (1 + r) * np.median(v))

    def no_floor(v, m, r):  # no relative floor: a flat loss flags any rise
        return math.inf if len(v) < 8 else np.median(v) + m * 1.4826 * np.median(np.abs(v - np.median(v)))

    rejected(operations.check_spike_limit, std_rule, "equals the monitor's", losses, 13, *knobs.values())
    rejected(operations.check_spike_limit, no_sigma, "equals the monitor's", losses, 13, *knobs.values())
    rejected(operations.check_spike_limit, no_floor, "equals the monitor's", losses, 13, *knobs.values())
    rejected(operations.check_spike_limit, lambda v, m, r: spike_limit(v + [0.0] * 8, m, r) if len(v) < 8
             else spike_limit(v, m, r), "threshold on only 5 values", losses, 13, *knobs.values())
    with pytest.raises(ExerciseFailed, match="flags exactly"):
        operations.check_spike_limit(spike_limit, losses, 12, **knobs)  # the graded run's alert is the truth


@pytest.fixture(scope="module")
def desynced():
    """Parameters replicated over data=4 (a norm vector and a matrix, no model built), with one element of
    data replica 1's copy of layers.wq moved by one ulp by the fault injector's flip."""
    from types import SimpleNamespace

    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from picotron_jax.config import MeshConfig
    from picotron_jax.debug.consistency import ReplicaCheck
    from picotron_jax.faults import flip_one_ulp
    from picotron_jax.mesh import build_mesh

    mesh = build_mesh(MeshConfig(data=4), jax.devices()[:4])
    rng = np.random.default_rng(0)
    params = {name: jax.device_put(rng.standard_normal(shape).astype(np.float32), NamedSharding(mesh, P()))
              for name, shape in (("norm", (32,)), ("wq", (32, 64)))}
    params, _ = flip_one_ulp({"layers": params}, "layers.wq", 1, mesh)
    state = SimpleNamespace(params=params, opt_state={})
    return state, ReplicaCheck(every=1).check(state, 1)


def test_11_replica_fingerprint(desynced):
    state, message = desynced
    assert message.startswith("replicas diverged: params.layers.wq")
    shard = np.asarray(state.params["layers"]["wq"].addressable_shards[0].data)

    def right(x):
        u = np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
        w = np.arange(u.size, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(1)
        return [int(u.sum() % 2**32), int((u * w).sum() % 2**32)]

    assert isinstance(operations.check_fingerprint(right, shard, state, message), Passed)
    assert isinstance(operations.check_fingerprint(operations.fingerprint_of, shard, state, message), Passed)
    rejected(operations.check_fingerprint, lambda x: [float(np.sum(x))], "one-ulp change", shard, state, message)
    rejected(operations.check_fingerprint, lambda x: right(x)[:1], "swapping two elements", shard, state, message)
    rejected(operations.check_fingerprint, lambda x: np.asarray(x).reshape(-1).view(np.uint32), "only a fingerprint",
             shard, state, message)
    rejected(operations.check_fingerprint, lambda x: [x.shape[0], int(np.argmax(x))], "one-ulp change", shard,
             state, message)


def test_12_fewest_shard_reads():
    from picotron_jax.tutorials import scale

    def belady(accesses, capacity, bypass=True):
        following, last = [0] * len(accesses), {}
        for pos in range(len(accesses) - 1, -1, -1):
            following[pos], last[accesses[pos]] = last.get(accesses[pos], math.inf), pos
        held, reads = {}, 0
        for pos, shard in enumerate(accesses):
            if shard not in held:
                reads += 1
                if len(held) >= capacity:
                    far = max(held, key=held.get)
                    if bypass and held[far] <= following[pos]:
                        continue
                    del held[far]
            held[shard] = following[pos]
        return reads

    run = [int(x) for x in np.random.default_rng(1).integers(0, 12, 200)]
    best = scale.fewest_reads(run, 4)
    assert best == belady(run, 4) < scale.lru_reads(run, 4)  # the exhaustive search agrees with Belady-with-bypass
    assert isinstance(scale.check_fewest_reads(belady, run, 4, best), Passed)
    rejected(scale.check_fewest_reads, scale.lru_reads, "the fewest reads", run, 4, best)
    rejected(scale.check_fewest_reads, lambda a, c: belady(a, c, bypass=False), "the fewest reads", run, 4, best)
    rejected(scale.check_fewest_reads, lambda a, c: len(set(a)), "the fewest reads", run, 4, best)  # cold misses
    rejected(scale.check_fewest_reads, belady, "between your minimum and 1.1x", run, 4, best - 1)


def test_13_layout_count():
    from picotron_jax.tutorials import scale
    from picotron_jax.tune.space import count_factorisations

    assert isinstance(scale.check_layout_count(count_factorisations), Passed)
    rejected(scale.check_layout_count, lambda n, k: math.comb(n + k - 1, k - 1),  # n balls, not its prime factors
             "layouts of 8 devices over 5")
    rejected(scale.check_layout_count, lambda n, k: k ** round(math.log2(n)), "layouts of 8 devices over 5")  # axes x choices
    rejected(scale.check_layout_count, lambda n, k: sum(1 for d in range(1, n + 1) if n % d == 0) ** (k - 1),
             "layouts of 8 devices over 5")  # independent divisors, product not kept

    def forgets_the_last_prime(n, k):  # stops at sqrt(n) without counting the prime left over
        total, p = 1, 2
        while p * p <= n:
            a = 0
            while n % p == 0:
                n, a = n // p, a + 1
            total *= math.comb(a + k - 1, k - 1)
            p += 1
        return total

    rejected(scale.check_layout_count, forgets_the_last_prime, "layouts of 12 devices over 3")


def test_14_curriculum_length():
    import picotron_jax as pj
    from picotron_jax.data.curriculum import Curriculum
    from picotron_jax.tutorials import scale

    c = pj.load_config("single", ["train.seq_len=32", "curriculum.kind=seqlen", "curriculum.start_seq_len=8",
                                  "curriculum.steps=6", "curriculum.seq_len_step=8"]).curriculum
    rows = [{"step": s, "seq_len": Curriculum(c, 32).length(s)} for s in range(1, 9)]  # what the run logs
    assert [r["seq_len"] for r in rows] == [8, 16, 16, 16, 16, 32, 32, 32]

    def right(step, c, T):
        return Curriculum(c, T).length(step)

    def pacing_only(step, c, T):  # the pacing value, not snapped to a bucket dividing seq_len
        degree = 1 if c.pacing == "fixed_linear" else c.root_degree
        d = math.floor((min(step, c.steps) / c.steps) ** (1 / degree) * (T - c.start_seq_len) + c.start_seq_len)
        return min(d - d % c.seq_len_step, T)

    def linear_always(step, c, T):  # ignores fixed_root
        return right(step, c.__class__(**{**c.__dict__, "pacing": "fixed_linear"}), T)

    def no_cap(step, c, T):  # keeps growing past curriculum.steps
        return right(step, c, T) if step <= c.steps else 2 * T

    assert isinstance(scale.check_seq_len(right, rows, c, 32), Passed)
    rejected(scale.check_seq_len, pacing_only, "length at step", rows, c, 32)
    rejected(scale.check_seq_len, linear_always, "fixed_root", rows, c, 32)
    rejected(scale.check_seq_len, no_cap, "length at step 101", rows, c, 32)
    bad_rows = [{**r, "seq_len": 32} for r in rows]  # a run that did not warm up at all
    rejected(scale.check_seq_len, right, "the seq_len the notebook's run logged", bad_rows, c, 32)


def test_15_maml_inner_loop():
    import jax
    import jax.numpy as jnp

    from picotron_jax.meta.sine import init_mlp, mse, sample_tasks
    from picotron_jax.tutorials import scale

    task = jax.tree.map(lambda a: jnp.asarray(a[0]), sample_tasks(7, 0, 1, 10, 10))
    theta = init_mlp(0, 8)
    args = (mse, theta, task["support"], task["query"])

    def right(loss_fn, th, support, lr, steps):
        for _ in range(steps):
            g = jax.grad(loss_fn)(th, support)
            th = jax.tree.map(lambda p, gp: p - lr * gp, th, g)
        return th

    def first_order(loss_fn, th, support, lr, steps):  # FOMAML: the gradient is stopped
        for _ in range(steps):
            g = jax.lax.stop_gradient(jax.grad(loss_fn)(th, support))
            th = jax.tree.map(lambda p, gp: p - lr * gp, th, g)
        return th

    assert isinstance(scale.check_adapt(right, *args), Passed)
    rejected(scale.check_adapt, first_order, "meta-gradient", *args)
    rejected(scale.check_adapt, lambda f, th, s, lr, n: right(f, th, s, lr, n - 1), "after 2 inner steps", *args)
    rejected(scale.check_adapt, lambda f, th, s, lr, n: right(f, th, s, -lr, n), "after 2 inner steps", *args)
    rejected(scale.check_adapt, lambda f, th, s, lr, n: jax.tree.leaves(right(f, th, s, lr, n)), "structure", *args)
