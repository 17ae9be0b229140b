"""The tutorial graders (picotron_jax/tutorials): each lesson's reference answer passes and at least three
seeded wrong answers are rejected with the failed property named."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from picotron_jax.tutorials import ExerciseFailed, Passed
from picotron_jax.tutorials import layouts, lessons


def rejected(check, answer, prop_part: str, *args):
    with pytest.raises(ExerciseFailed) as info:
        check(answer, *args)
    assert prop_part in info.value.prop, info.value.prop
    return info.value


def test_01_device_shapes():
    right = {"layers.wq": (4, 32, 4, 16), "layers.w_down": (4, 176, 32), "embed": (128, 32), "lm_head": (32, 128)}
    assert isinstance(layouts.check_device_shapes(right), Passed)
    rejected(layouts.check_device_shapes, {**right, "layers.wq": (4, 128, 4, 16)}, "per-device shape of layers.wq")
    rejected(layouts.check_device_shapes, {**right, "lm_head": (128, 128)}, "per-device shape of lm_head")
    rejected(layouts.check_device_shapes, {**right, "layers.w_o": (4, 4, 16, 128)}, "every name is a parameter")


def test_02_zero_state_bytes():
    def right(n, data, stage):
        return (n // data if stage >= 3 else n), (2 * n // data if stage >= 1 else 2 * n)

    assert isinstance(layouts.check_state_bytes(right), Passed)
    rejected(layouts.check_state_bytes, lambda n, d, s: (n // d if s >= 1 else n, 2 * n // d if s >= 1 else 2 * n),
             "parameter bytes per device, data=8, ZeRO-1")
    rejected(layouts.check_state_bytes, lambda n, d, s: (n // d if s >= 3 else n, 2 * n // d if s == 1 else 2 * n),
             "optimizer bytes per device, data=8, ZeRO-3")
    rejected(layouts.check_state_bytes, lambda n, d, s: (n // d if s >= 3 else n, n // d if s >= 1 else n),
             "optimizer bytes per device, data=8, ZeRO-0")


def test_03_row_parallel_and_its_bytes():
    assert isinstance(layouts.check_row_parallel(layouts.reference_row_parallel), Passed)
    rejected(layouts.check_row_parallel, lambda x, w: x @ w, "reduced over 'tensor'")  # the missing reduction
    rejected(layouts.check_row_parallel, lambda x, w: jax.lax.pmean(x @ w, "tensor"), "forward equals")
    rejected(layouts.check_row_parallel, lambda x, w: jax.lax.psum(x @ w, "data"), "reduced over 'tensor'")

    assert isinstance(layouts.check_allreduce_bytes(lambda b, d, dp, tp, s: b // dp * d * s), Passed)
    rejected(layouts.check_allreduce_bytes, lambda b, d, dp, tp, s: b * d * s, "all-reduce bytes")
    rejected(layouts.check_allreduce_bytes, lambda b, d, dp, tp, s: b // dp * d * s // tp, "all-reduce bytes")
    rejected(layouts.check_allreduce_bytes, lambda b, d, dp, tp, s: 2 * (tp - 1) * b // dp * d * s // tp,
             "all-reduce bytes")


def test_04_microbatches_for_a_target_bubble():
    def right(kind, p, target, v):
        v = v if kind == "interleaved" else 1
        m = math.ceil((p - 1) * (1 - target) / (target * v) - 1e-9)  # (p-1)/(v m + p-1) <= target
        step = p if kind == "interleaved" else 1
        return max(step, math.ceil(m / step) * step)

    assert isinstance(lessons.check_microbatches(right), Passed)
    rejected(lessons.check_microbatches, lambda k, p, t, v: right(k, p, t, v) + (p if k == "interleaved" else 1),
             "is the fewest")
    rejected(lessons.check_microbatches, lambda k, p, t, v: math.ceil((p - 1) * (1 - t) / t / v) if k == "interleaved"
             else right(k, p, t, v), "valid microbatch count")  # forgot the multiple of p
    rejected(lessons.check_microbatches, lambda k, p, t, v: math.ceil((p - 1) / t), "is the fewest")  # ignores v


def test_05_zigzag_layout():
    def right(T, c):
        ch = np.arange(T).reshape(2 * c, -1)
        return np.concatenate([np.concatenate([ch[i], ch[2 * c - 1 - i]]) for i in range(c)])

    assert isinstance(lessons.check_zigzag(right), Passed)
    rejected(lessons.check_zigzag, lambda T, c: np.arange(T), "the same causal pairs")  # contiguous: unbalanced
    rejected(lessons.check_zigzag, lambda T, c: np.concatenate(
        [np.concatenate([np.arange(T).reshape(2 * c, -1)[i], np.arange(T).reshape(2 * c, -1)[2 * c - i - 1 - (i > 0)]])
         for i in range(c)]), "every position appears once")
    rejected(lessons.check_zigzag, lambda T, c: np.concatenate(  # zigzag per token: balanced, not in chunks
        [np.sort(np.concatenate([np.arange(i, T, 2 * c), np.arange(2 * c - 1 - i, T, 2 * c)])) for i in range(c)]),
        "whole chunks")


def test_06_dropped_fraction():
    def right(load_BE, T, k, f):
        E = load_BE.shape[1]
        cap = max(1, min(T, math.ceil(T * k / E * f)))
        return np.maximum(load_BE - cap, 0).sum() / load_BE.sum()

    assert isinstance(lessons.check_dropped_fraction(right), Passed)
    rejected(lessons.check_dropped_fraction, lambda L, T, k, f: np.maximum(
        L - math.floor(T * k / L.shape[1] * f), 0).sum() / L.sum(), "capacity factor")  # floor, not ceil
    rejected(lessons.check_dropped_fraction, lambda L, T, k, f: np.maximum(   # pooled over the batch
        L.sum(0) - L.shape[0] * math.ceil(T * k / L.shape[1] * f),
        0).sum() / L.sum(), "capacity factor")
    rejected(lessons.check_dropped_fraction, lambda L, T, k, f: np.maximum(   # per token, not per copy
        L - math.ceil(T * k / L.shape[1] * f), 0).sum() / (L.sum() / k), "capacity factor")


def test_08_dynamic_loss_scale():
    def right(scale, good, finite, interval):
        if not finite:
            return max(scale / 2, 1.0), 0
        good += 1
        return (scale * 2, 0) if good >= interval else (scale, good)

    assert isinstance(lessons.check_loss_scale(right), Passed)
    rejected(lessons.check_loss_scale, lambda s, g, f, i: (s / 2, 0) if not f else right(s, g, f, i), "scale after step")
    rejected(lessons.check_loss_scale, lambda s, g, f, i: (max(s / 2, 1), g) if not f else right(s, g, f, i),
             "finite-step counter")
    rejected(lessons.check_loss_scale, lambda s, g, f, i: (s * 2, g + 1) if f and g + 1 >= i else right(s, g, f, i),
             "finite-step counter")


def test_07_restore_onto_a_new_mesh_with_plain_orbax(tmp_path):
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from helpers import preset, setup
    from picotron_jax.checkpoint.manager import Checkpointer
    from picotron_jax.train.state import init_train_state

    cfg = preset("tp2-dp4", "checkpoint.codec=none", "checkpoint.async_save=false")
    _, st = setup(cfg)
    state = init_train_state(cfg, st)
    ckpt = Checkpointer(tmp_path / "ckpt", cfg, say=lambda _m: None)
    ckpt.save(state, {"mesh": "tp2-dp4"})
    ckpt.close()
    state_dir = tmp_path / "ckpt" / "0" / "state"
    saved = {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x)
             for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    mesh = jax.make_mesh((8,), ("x",))

    def restorer(pick_dim=lambda dims: dims[0], dtype=None, restore_type=None):
        def restore(state_dir, mesh):
            ckptr = ocp.PyTreeCheckpointer()

            def args(m):
                if restore_type is not None:
                    return ocp.RestoreArgs(restore_type=restore_type)
                dims = [d for d, s in enumerate(m.shape) if s % 8 == 0] if len(m.shape) >= 2 else []
                spec = P(*([None] * pick_dim(dims) + ["x"])) if dims and pick_dim(dims) is not None else P()
                return ocp.ArrayRestoreArgs(sharding=NamedSharding(mesh, spec), dtype=dtype)

            full = ckptr.metadata(state_dir).item_metadata.tree
            item = jax.tree.map(lambda _: 0, full)
            rargs = jax.tree.map(args, full)
            out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=rargs))
            return out["params"]
        return restore

    assert isinstance(lessons.check_restore(restorer(), state_dir, saved, mesh), Passed)
    rejected(lessons.check_restore, restorer(restore_type=np.ndarray), "is a jax.Array on the new mesh",
             state_dir, saved, mesh)
    rejected(lessons.check_restore, restorer(pick_dim=lambda dims: None), "is laid out as", state_dir, saved, mesh)
    rejected(lessons.check_restore, restorer(pick_dim=lambda dims: dims[-1]), "is laid out as", state_dir, saved, mesh)
    rejected(lessons.check_restore, restorer(dtype=jax.numpy.bfloat16), "equals the saved values",  # lossy cast
             state_dir, saved, mesh)


def test_09_straggler_from_the_profile_rows():
    rows = [{"device": d, "compute_s": 0.05, "collective_s": 0.01, "wait_s": 0.02 if d == 5 else 0.3 + 0.01 * d}
            for d in range(8)]
    right = lambda rs: min(rs, key=lambda r: r["wait_s"])["device"]  # noqa: E731
    assert isinstance(lessons.check_straggler(right, rows, 5), Passed)
    rejected(lessons.check_straggler, lambda rs: max(rs, key=lambda r: r["wait_s"])["device"], "made late", rows, 5)
    rejected(lessons.check_straggler, lambda rs: int(np.argmin([r["wait_s"] for r in rs])), "another order", rows, 5)
    rejected(lessons.check_straggler, lambda rs: rs[5]["device"], "another order", rows, 5)  # position, not numbers
