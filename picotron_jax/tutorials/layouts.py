"""Graders of lessons 01-03: per-device shapes under a layout, ZeRO's bytes per device, a tensor-parallel
reduction and its collective bytes in the compiled HLO."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from picotron_jax.tutorials.grading import Checker, Passed


def _setup(preset: str, overrides: list[str]):
    from picotron_jax.config import load_config
    from picotron_jax.run import build_run

    return build_run(load_config(preset, overrides), data=False)


@functools.lru_cache(maxsize=16)
def _true_device_shapes(preset: str, overrides: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return true_device_shapes(preset, list(overrides))


def true_device_shapes(preset: str, overrides: list[str]) -> dict[str, tuple[int, ...]]:
    """What one device holds of every parameter under the run's layout (from its shardings)."""
    from picotron_jax.observe.shardings import sharding_table

    run = _setup(preset, overrides)
    tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        run.setup.abstract.params, run.setup.shardings.params)
    return {r.path: r.device_shape for r in sharding_table(tree)}


def check_device_shapes(answer: dict, preset: str = "tp2-dp4", overrides=("train.zero_stage=3",)) -> Passed:
    """01: `answer` maps parameter names (`layers.wq`, ...) to the shape one device holds."""
    c = Checker("01_mesh_and_shardings")
    truth = _true_device_shapes(preset, tuple(overrides))
    c.expect(isinstance(answer, dict) and len(answer) > 0, "answer is a dict {parameter: per-device shape}",
             f"got {type(answer).__name__}")
    unknown = sorted(set(answer) - set(truth))
    c.expect(not unknown, "every name is a parameter", f"unknown {unknown}; parameters are {sorted(truth)}")
    for name, shape in answer.items():
        try:
            got = tuple(int(n) for n in shape)
        except TypeError:
            got = None
        c.expect(got is not None, f"per-device shape of {name} is a tuple of ints", f"got {shape!r}")
        c.expect(got == truth[name], f"per-device shape of {name}",
                 f"you said {got}, the layout gives {truth[name]}")
    return c.result


def check_state_bytes(fn, cases=((8, 0), (8, 1), (8, 3), (4, 3))) -> Passed:
    """02: fn(param_bytes, data, zero_stage) -> (parameter bytes, Adam-moment bytes) per device, checked
    against the shardings of a `dp` run with that many data ranks (4 KiB allowance for counters)."""
    c = Checker("02_data_parallel_and_zero")
    for data, stage in cases:
        run = _setup("dp8", [f"mesh.data={data}", f"mesh.num_devices={data}", f"train.zero_stage={stage}"])
        from picotron_jax.parallel.sharding import bytes_per_device

        total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(run.setup.abstract.params))
        want_p = bytes_per_device(run.setup.abstract.params, run.setup.shardings.params)
        want_o = bytes_per_device(run.setup.abstract.opt_state, run.setup.shardings.opt_state)
        got = c.call(f"fn runs for data={data}, ZeRO-{stage}", fn, total, data, stage)
        got_p, got_o = (int(x) for x in got)
        c.expect(got_p == want_p, f"parameter bytes per device, data={data}, ZeRO-{stage}",
                 f"you said {got_p:,}, the layout holds {want_p:,}")
        c.expect(abs(got_o - want_o) <= 4096, f"optimizer bytes per device, data={data}, ZeRO-{stage}",
                 f"you said {got_o:,}, the layout holds {want_o:,} (difference {got_o - want_o:+,})")
    return c.result


# ------------------------------------------------------------------------------ 03 tensor parallel


def _tp_mesh(data: int, tensor: int):
    from picotron_jax.config import MeshConfig
    from picotron_jax.mesh import build_mesh

    return build_mesh(MeshConfig(data=data, tensor=tensor), jax.devices()[: data * tensor])


def row_parallel(fn, mesh, x_BF, w_FD):
    """Run fn(x_bf, w_fD) -> y_bD per device: x split on (data, tensor), w on tensor, y over data."""
    return jax.shard_map(fn, mesh=mesh, in_specs=(P("data", "tensor"), P("tensor", None)),
                         out_specs=P("data", None))(x_BF, w_FD)


def reference_row_parallel(x_bf, w_fD):
    """The Megatron row-parallel projection: each rank multiplies its slice of F, then one all-reduce."""
    return jax.lax.psum(x_bf @ w_fD, "tensor")


def check_row_parallel(fn, data: int = 2, tensor: int = 4) -> Passed:
    """03a: fn is the per-device body of a row-parallel projection; forward and gradients must equal x @ w."""
    c = Checker("03_tensor_parallel")
    mesh = _tp_mesh(data, tensor)
    kx, kw = jax.random.split(jax.random.key(0))
    x_BF = jax.random.normal(kx, (8, 32), jnp.float32)
    w_FD = jax.random.normal(kw, (32, 16), jnp.float32)
    x_BF = jax.device_put(x_BF, NamedSharding(mesh, P("data", "tensor")))
    w_FD = jax.device_put(w_FD, NamedSharding(mesh, P("tensor", None)))
    y = c.call("output is the same on every tensor rank (the partial products are reduced over 'tensor')",
               lambda: jax.jit(lambda a, b: row_parallel(fn, mesh, a, b))(x_BF, w_FD))
    want = np.asarray(x_BF) @ np.asarray(w_FD)
    err = float(np.max(np.abs(np.asarray(y) - want)))
    c.expect(err < 1e-4, "forward equals the one-device x @ w", f"max |difference| = {err:.3g}")

    def loss(f):
        return lambda a, b: jnp.sum(jnp.sin(f(a, b)))

    g = jax.jit(jax.grad(loss(lambda a, b: row_parallel(fn, mesh, a, b)), argnums=(0, 1)))(x_BF, w_FD)
    g_ref = jax.grad(loss(lambda a, b: a @ b), argnums=(0, 1))(np.asarray(x_BF), np.asarray(w_FD))
    for name, a, b in zip(("x", "w"), g, g_ref):
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        c.expect(err < 1e-4, f"gradient of {name} equals one device's", f"max |difference| = {err:.3g}")
    return c.result


@functools.lru_cache(maxsize=32)
def measured_allreduce_bytes(batch: int, d: int, data: int, tensor: int, dtype=jnp.float32) -> int:
    """All-reduce bytes per device in the compiled HLO of the reference row-parallel projection."""
    from picotron_jax.observe.hlo import collective_bytes

    mesh = _tp_mesh(data, tensor)
    x = jax.ShapeDtypeStruct((batch, 8 * tensor), dtype, sharding=NamedSharding(mesh, P("data", "tensor")))
    w = jax.ShapeDtypeStruct((8 * tensor, d), dtype, sharding=NamedSharding(mesh, P("tensor", None)))
    text = jax.jit(lambda a, b: row_parallel(reference_row_parallel, mesh, a, b)).lower(x, w).compile().as_text()
    return collective_bytes(text)["all-reduce"]


def check_allreduce_bytes(fn, cases=((8, 64, 2, 4, 4), (16, 128, 1, 8, 4), (32, 48, 4, 2, 4))) -> Passed:
    """03b: fn(batch, d, data, tensor, itemsize) -> all-reduce bytes per device of the row-parallel output,
    as the compiled HLO counts them (the tensor's size, nccl-tests' convention)."""
    c = Checker("03_tensor_parallel")
    for batch, d, data, tensor, itemsize in cases:
        dtype = {4: jnp.float32, 2: jnp.bfloat16}[itemsize]
        want = measured_allreduce_bytes(batch, d, data, tensor, dtype)
        got = c.call("fn runs", fn, batch, d, data, tensor, itemsize)
        c.expect(int(got) == want, f"all-reduce bytes (batch={batch}, d={d}, data={data}, tensor={tensor}, "
                 f"{itemsize}-byte dtype) equal the compiled HLO's", f"you said {int(got):,}, the HLO moves {want:,}")
    return c.result
