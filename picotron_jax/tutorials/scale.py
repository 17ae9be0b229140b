"""Graders of lessons 12-15: the fewest shard reads of a known access sequence (against an exhaustive search
and the shard cache's own fetches), the number of mesh layouts (against the tuner's enumeration), the
curriculum's sequence length (against data/curriculum.py), and a MAML inner loop (against the meta
learner's adapted parameters and meta-gradient)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from picotron_jax.tutorials.grading import Checker, Passed

# ------------------------------------------------------------------------------ 12 data at scale


def fewest_reads(accesses: list[int], capacity: int) -> int:
    """The true minimum of store reads for `accesses` with room for `capacity` shards, by exhaustive search
    over every cache content after every access (a read shard may be kept, replace one, or not be kept)."""
    costs: dict[frozenset, int] = {frozenset(): 0}
    for shard in accesses:
        nxt: dict[frozenset, int] = {}
        for held, cost in costs.items():
            if shard in held:
                options, cost_now = [held], cost
            else:
                options, cost_now = [held], cost + 1
                options += [held | {shard}] if len(held) < capacity else [(held - {old}) | {shard} for old in held]
            for o in options:
                if nxt.get(o, cost_now + 1) > cost_now:
                    nxt[o] = cost_now
        costs = nxt
    return min(costs.values())


def lru_reads(accesses: list[int], capacity: int) -> int:
    """Store reads of a least-recently-used cache of `capacity` shards: what the shard cache's Belady eviction
    is compared against (the lesson, its grader tests and tests/test_data_cache.py)."""
    cache: OrderedDict[int, None] = OrderedDict()
    reads = 0
    for shard in accesses:
        if shard in cache:
            cache.move_to_end(shard)
            continue
        reads += 1
        cache[shard] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return reads


def _sequences(seed: int = 0) -> list[tuple[str, list[int], int]]:
    rng = np.random.default_rng(seed)
    loop = list(range(5)) * 3
    return [("a loop over 5 shards, room for 2", loop, 2),
            ("a loop over 5 shards, room for 4", loop, 4),
            ("random reads of 6 shards, room for 3", [int(x) for x in rng.integers(0, 6, 16)], 3),
            ("a hot shard among cold ones, room for 2", [0, 1, 0, 2, 0, 3, 0, 4, 1, 0, 2, 0, 3], 2),
            ("everything fits, room for 6", [int(x) for x in rng.integers(0, 5, 14)], 6)]


def check_fewest_reads(fn, run_accesses: list[int], capacity: int, measured_fetches: int) -> Passed:
    """fn(accesses, capacity) -> the fewest store reads any cache of `capacity` shards can do, knowing the
    future; checked against an exhaustive search on small sequences, then on the notebook's run: the shard
    cache (Belady eviction with bypass) fetched no fewer, and at most 1.1x as many."""
    c = Checker("12_data_at_scale")
    for what, seq, cap in _sequences():
        want = fewest_reads(seq, cap)
        got = int(c.call("fn runs", fn, list(seq), cap))
        c.expect(got == want, f"the fewest reads for {what}", f"you have {got}, the exhaustive search finds {want}")
    got = int(c.call("fn runs", fn, list(run_accesses), capacity))
    c.expect(got <= measured_fetches <= 1.1 * got,
             "the run's shard cache fetched between your minimum and 1.1x it",
             f"your minimum {got}, the cache fetched {measured_fetches}")
    return c.result


# ------------------------------------------------------------------------------ 13 auto-tuning


def check_layout_count(fn, cases=((8, 5), (8, 3), (12, 3), (16, 4), (6, 2), (1, 5), (30, 3))) -> Passed:
    """fn(n, k) -> how many ways n devices factor over k ordered mesh axes (sizes >= 1, product n); checked
    against tune/space.factorisations, which the layout search enumerates."""
    from picotron_jax.tune.space import factorisations

    c = Checker("13_auto_tuning")
    for n, k in cases:
        want = len(factorisations(n, k))
        got = int(c.call("fn runs", fn, n, k))
        c.expect(got == want, f"layouts of {n} devices over {k} axes", f"you have {got}, the tuner enumerates {want}")
    return c.result


# ------------------------------------------------------------------------------ 14 curriculum


def _curricula():
    from picotron_jax.config import load_config

    cases = [(128, ["curriculum.pacing=fixed_linear", "curriculum.steps=100", "curriculum.start_seq_len=16",
                    "curriculum.seq_len_step=16"]),
             (96, ["curriculum.pacing=fixed_linear", "curriculum.steps=40", "curriculum.start_seq_len=8",
                   "curriculum.seq_len_step=8"]),
             (96, ["curriculum.pacing=fixed_linear", "curriculum.steps=40", "curriculum.start_seq_len=8",
                   "curriculum.seq_len_step=8", "curriculum.constant_tokens=false"]),
             (128, ["curriculum.pacing=fixed_root", "curriculum.root_degree=2", "curriculum.steps=60",
                    "curriculum.start_seq_len=16", "curriculum.seq_len_step=16"])]
    return [(T, load_config("single", [f"train.seq_len={T}", "curriculum.kind=seqlen", *o]).curriculum)
            for T, o in cases]


def check_seq_len(fn, run_rows: list[dict], run_curriculum, run_seq_len: int) -> Passed:
    """fn(step, c, seq_len) -> the sequence length optimizer step `step` (1-based) trains on under curriculum
    config `c`: DeepSpeed's pacing value snapped down to a bucket (a multiple of c.seq_len_step, with
    c.constant_tokens also a divisor of seq_len). Checked at every step (and past the end) against
    data/curriculum.Curriculum, then against the seq_len logged by the notebook's run."""
    from picotron_jax.data.curriculum import Curriculum

    c = Checker("14_curriculum")
    for T, cur in [*_curricula(), (run_seq_len, run_curriculum)]:
        ref = Curriculum(cur, T)
        what = (f"{cur.pacing}{f' root {cur.root_degree}' if cur.pacing == 'fixed_root' else ''}, "
                f"{cur.start_seq_len} -> {T} in {cur.steps} steps by {cur.seq_len_step}"
                f"{'' if cur.constant_tokens else ', constant_tokens=false'}")
        for step in range(1, cur.steps + 4):
            got = int(c.call("fn runs", fn, step, cur, T))
            want = ref.length(step)
            c.expect(got == want, f"length at step {step} ({what})", f"you have {got}, the curriculum has {want}")
    for row in run_rows:
        got = int(fn(row["step"], run_curriculum, run_seq_len))
        c.expect(got == row["seq_len"], "equals the seq_len the notebook's run logged",
                 f"step {row['step']}: you have {got}, the run trained on {row['seq_len']}")
    return c.result


# ------------------------------------------------------------------------------ 15 meta-learning


_REFERENCE: dict = {}


def _maml_reference(loss_fn, theta, support, query, lr: float, steps: int):
    """(adapted parameters, meta-gradient) of the meta learner's second-order MAML, compiled once per inputs."""
    import jax
    import jax.numpy as jnp

    from picotron_jax.meta.algorithms import adapt

    key = (loss_fn, id(theta), id(support), id(query), lr, steps)
    if key not in _REFERENCE:
        lrs = jax.tree.map(lambda x: jnp.full_like(x, lr), theta)

        def both(th):
            return (adapt(loss_fn, th, support, lrs, steps),
                    jax.grad(lambda t: loss_fn(adapt(loss_fn, t, support, lrs, steps), query))(th))

        _REFERENCE.clear()
        _REFERENCE[key] = (theta, support, query, jax.jit(both)(theta))  # the inputs are kept: ids stay theirs
    return _REFERENCE[key][3]


def check_adapt(fn, loss_fn, theta, support, query, lr: float = 0.01, steps: int = 2) -> Passed:
    """fn(loss_fn, theta, support, lr, steps) -> parameters after `steps` SGD steps on the support set,
    differentiable: checked against the meta learner's adapted parameters, and the meta-gradient through
    it (grad of the query loss after adaptation w.r.t. theta) against the library's second-order MAML."""
    import jax
    import jax.numpy as jnp

    c = Checker("15_meta_learning")
    want, g_want = _maml_reference(loss_fn, theta, support, query, lr, steps)
    got = c.call("fn runs under jax.jit", jax.jit(lambda th: fn(loss_fn, th, support, lr, steps)), theta)
    c.expect(jax.tree.structure(got) == jax.tree.structure(want), "the adapted parameters have theta's structure",
             f"got {jax.tree.structure(got)}")
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    c.expect(err < 1e-5, f"the parameters after {steps} inner steps equal the meta learner's",
             f"max |difference| = {err:.3g}")
    g_got = c.call("fn is differentiable", jax.jit(jax.grad(lambda th: loss_fn(fn(loss_fn, th, support, lr, steps),
                                                                               query))), theta)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_want))
    c.expect(err <= 1e-4 * max(scale, 1.0), "the meta-gradient through your inner loop equals second-order MAML's",
             f"max |difference| = {err:.3g} (largest component {scale:.3g}); is a gradient stopped?")
    return c.result
