"""Graders of lessons 04-08: microbatches for a target bubble, the zigzag layout, dropped MoE token copies,
the dynamic loss scale, restoring a checkpoint onto another mesh with plain Orbax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.tutorials.grading import Checker, Passed

# ------------------------------------------------------------------------------ 04 pipeline schedules


def check_microbatches(fn, cases=(("1f1b", 4, 0.2, 1), ("afab", 2, 0.1, 1), ("interleaved", 2, 0.1, 2),
                                  ("interleaved", 4, 0.15, 2), ("1f1b", 8, 0.3, 1))) -> Passed:
    """fn(kind, p, target, v) -> the fewest microbatches m whose counted bubble is at most `target`,
    checked on the executed schedule tables (interleaved also needs m to be a multiple of p)."""
    from picotron_jax.parallel.pipeline_schedule import build_schedule

    c = Checker("04_pipeline_schedules")
    for kind, p, target, v in cases:
        m = int(c.call("fn runs", fn, kind, p, target, v))
        step = p if kind == "interleaved" else 1
        c.expect(m >= 1 and m % step == 0, f"{kind} p={p}: m is a valid microbatch count",
                 f"m={m}" + (f" is not a multiple of p={p}" if kind == "interleaved" else ""))
        bubble = build_schedule(kind, p, m, v).bubble_fraction()
        c.expect(bubble <= target + 1e-12, f"{kind} p={p} v={v}: bubble of m={m} is at most {target}",
                 f"the schedule table counts {bubble:.3f}")
        if m - step >= 1:
            fewer = build_schedule(kind, p, m - step, v).bubble_fraction()
            c.expect(fewer > target + 1e-12, f"{kind} p={p} v={v}: m={m} is the fewest that reaches {target}",
                     f"m={m - step} already gives {fewer:.3f}")
    return c.result


# ------------------------------------------------------------------------------ 05 context parallel


def causal_pairs(order: np.ndarray, context: int) -> np.ndarray:
    """[c]: causal query x key pairs each context rank scores when it holds the queries `order` names."""
    q = np.asarray(order).reshape(context, -1)
    return (q + 1).sum(axis=1)


def check_zigzag(fn, cases=((16, 2), (32, 4), (64, 8))) -> Passed:
    """fn(seq_len, context) -> natural position of each layout column ([seq_len], device i holds
    columns i*T/c .. (i+1)*T/c - 1): a permutation of 2 contiguous chunks per device, equal causal work."""
    from picotron_jax.parallel.sharding import zigzag_order

    c = Checker("05_context_parallel")
    for T, cp in cases:
        order = np.asarray(c.call("fn runs", fn, T, cp)).astype(int).reshape(-1)
        c.expect(order.shape == (T,) and sorted(order.tolist()) == list(range(T)),
                 f"T={T}, c={cp}: every position appears once", f"got {order.tolist()}")
        work = causal_pairs(order, cp)
        c.expect(work.max() == work.min(), f"T={T}, c={cp}: every rank scores the same causal pairs",
                 f"pairs per rank {work.tolist()} (max / min {work.max() / work.min():.2f})")
        chunk = T // (2 * cp)
        blocks = order.reshape(2 * cp, chunk)
        c.expect(bool(np.all(np.diff(blocks, axis=1) == 1)) and bool(np.all(blocks[:, 0] % chunk == 0)),
                 f"T={T}, c={cp}: each device holds whole chunks of T/2c contiguous positions (the ring's block "
                 "skipping needs them)", f"rows of {chunk}: {blocks.tolist()}")
        want = zigzag_order(T, cp)
        c.expect(np.array_equal(order, want), f"T={T}, c={cp}: it is the layout the train step uses",
                 f"yours {order.tolist()} vs {want.tolist()}")
    return c.result


# ------------------------------------------------------------------------------ 06 mixture of experts


def moe_routing_sample(seq_len: int = 64, num_experts: int = 8, top_k: int = 2, batch: int = 4, skew: float = 1.5):
    """Experts chosen by the project's router for random tokens (a skewed router, so some experts overflow)."""
    from picotron_jax.config_sections import MoEConfig
    from picotron_jax.models.moe import route

    kh, kr = jax.random.split(jax.random.key(1))
    h = jax.random.normal(kh, (batch, seq_len, 16))
    router = jax.random.normal(kr, (16, num_experts)) + skew * jnp.linspace(-1, 1, num_experts)[None]
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k)
    return route(h, router, None, cfg)


def true_dropped_fraction(r, num_experts: int, factor: float, positions_BTK=None) -> float:
    """Share of token copies the capacity dispatch of models/moe.py drops (`positions_BTK`: the copies' ranks
    from `capacity_positions`, when already computed: they do not depend on the capacity)."""
    from picotron_jax.models.moe import capacity_masks, capacity_positions, expert_capacity

    B, T, K = r.experts_BTK.shape
    cap = expert_capacity(T, K, num_experts, factor)
    pos = capacity_positions(r.experts_BTK, r.priority_BTK, num_experts) if positions_BTK is None else positions_BTK
    _, _, kept = capacity_masks(r.experts_BTK, r.weights_BTK, pos, num_experts, cap)
    return 1.0 - float(jnp.mean(kept.astype(jnp.float32)))


@functools.lru_cache(maxsize=4)
def _drop_sample(factors: tuple[float, ...], E: int = 8):
    """(load_BE, T, K, the layer's dropped fraction per factor) of one routing sample (computed once)."""
    r = moe_routing_sample(num_experts=E)
    load_BE = np.asarray(jax.nn.one_hot(r.experts_BTK, E).sum(axis=(1, 2))).astype(int)
    from picotron_jax.models.moe import capacity_positions

    pos = capacity_positions(r.experts_BTK, r.priority_BTK, E)
    return (load_BE, r.experts_BTK.shape[1], r.experts_BTK.shape[2],
            [true_dropped_fraction(r, E, f, pos) for f in factors])


def check_dropped_fraction(fn, factors=(0.5, 0.7, 1.1, 1.25, 2.0)) -> Passed:
    """fn(load_BE, seq_len, top_k, factor) -> fraction of token copies dropped, where load_BE counts the
    copies each sequence sends to each expert; checked against the layer's own dispatch."""
    c = Checker("06_mixture_of_experts")
    load_BE, T, K, truth = _drop_sample(tuple(factors))
    for f, want in zip(factors, truth):
        got = float(c.call("fn runs", fn, load_BE, T, K, f))
        c.expect(abs(got - want) < 1e-6, f"dropped fraction at capacity factor {f} equals the layer's",
                 f"you said {got:.4f}, the dispatch drops {want:.4f}")
    return c.result


# ------------------------------------------------------------------------------ 08 loss scaling


def check_loss_scale(fn, interval: int = 3) -> Passed:
    """fn(scale, good_steps, finite, interval) -> (scale, good_steps), checked step by step against
    train/precision.update_loss_scale over a run of finite and overflowing steps."""
    from picotron_jax.train.precision import LossScaleState, update_loss_scale

    c = Checker("08_precision_and_memory")
    events = [True, True, True, False, True, False, False, True, True, True, True] + [False] * 16
    state = LossScaleState(scale=jnp.float32(8.0), good_steps=jnp.int32(0), skipped=jnp.int32(0),
                           module_overflows=jnp.zeros((1,), jnp.int32))
    scale, good = 8.0, 0
    for i, finite in enumerate(events):
        state = update_loss_scale(state, jnp.bool_(finite), jnp.int32(-1), interval)
        scale, good = (float(x) for x in c.call("fn runs", fn, scale, good, finite, interval))
        what = "finite" if finite else "overflow"
        c.expect(scale == float(state.scale), f"scale after step {i} ({what})",
                 f"you have {scale:g}, the trainer has {float(state.scale):g}")
        c.expect(good == int(state.good_steps), f"finite-step counter after step {i} ({what})",
                 f"you have {good:g}, the trainer has {int(state.good_steps)}")
    return c.result


# ------------------------------------------------------------------------------ 07 checkpoints


def check_restore(fn, step_dir, reference: dict, mesh) -> Passed:
    """fn(state_dir, mesh) -> the parameters restored with plain Orbax onto `mesh`, every matrix split over
    the mesh's first axis on its first dimension that divides (vectors and scalars replicated)."""
    from jax.sharding import PartitionSpec as P

    c = Checker("07_checkpoints")
    params = c.call("fn runs", fn, str(step_dir), mesh)
    flat = {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    c.expect(sorted(flat) == sorted(reference), "the restored tree has every parameter",
             f"missing {sorted(set(reference) - set(flat))}, extra {sorted(set(flat) - set(reference))}")
    axis, n = mesh.axis_names[0], mesh.shape[mesh.axis_names[0]]
    for name, x in flat.items():
        c.expect(isinstance(x, jax.Array) and set(x.sharding.device_set) == set(mesh.devices.flat),
                 f"{name} is a jax.Array on the new mesh", f"got {type(x).__name__}")
        dims = [d for d, s in enumerate(x.shape) if s % n == 0] if x.ndim >= 2 else []
        spec = P(*([None] * dims[0] + [axis])) if dims else P()
        c.expect(x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), x.ndim),
                 f"{name} is laid out as {spec}", f"got {getattr(x.sharding, 'spec', x.sharding)}")
        err = float(np.max(np.abs(np.asarray(x) - reference[name])))
        c.expect(err == 0.0, f"{name} equals the saved values", f"max |difference| = {err:.3g}")
    return c.result


# ------------------------------------------------------------------------------ 09 profiler


def check_straggler(fn, devices: list[dict], late_device: int) -> Passed:
    """fn(device rows of profile.json) -> the device id of the straggler; checked against the device the fault
    injector made late, also with the rows shuffled (the answer must come from the numbers, not the order)."""
    c = Checker("09_profiler")
    got = c.call("fn runs", fn, [dict(r) for r in devices])
    c.expect(got == late_device, "names the device the fault injector made late",
             f"you named {got}, the injected straggler is device {late_device}; "
             f"waits: {[(r['device'], round(r['wait_s'] * 1e3, 1)) for r in devices]} ms")
    shuffled = [dict(r) for r in devices[::-1]]
    got = c.call("fn runs", fn, shuffled)
    c.expect(got == late_device, "the same answer with the rows in another order",
             f"you named {got} for the reversed rows")
    return c.result
