"""Matmul FLOPs of a traced program, loops counted by their trip counts (recomputation included).

XLA's `cost_analysis()` counts the body of a while loop once, however many times it runs: a
scanned layer stack, a gradient-accumulation scan or a rematerialised layer all look cheaper than
they are. Walking the jaxpr instead multiplies each scan body by its length, and sees the
recomputation a `jax.checkpoint` policy adds in the backward pass (it is part of the jaxpr).
Only dot_general is counted (2 x output elements x contracted size): the matmuls are what remat
policies trade against memory; elementwise work is small next to them.
"""

from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jex_core


def sub_jaxprs(value: Any):
    """The jaxprs an equation parameter holds (scan, cond, pjit, custom_vjp bodies, ...)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from sub_jaxprs(v)


def _dot_flops(eqn) -> float:
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in contract_lhs)


def jaxpr_flops(jaxpr: jex_core.Jaxpr, devices: int = 1) -> float:
    """Global matmul FLOPs of `jaxpr` (shard_map bodies, written per device, count once per device)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        inner = 0.0
        branches = [jaxpr_flops(j) for v in eqn.params.values() for j in sub_jaxprs(v)]
        if not branches:
            continue
        if name == "cond":
            inner = max(branches)  # one branch runs
        else:
            inner = sum(branches)
        if name == "scan":
            inner *= eqn.params["length"]
        elif name == "shard_map":
            inner *= eqn.params["mesh"].size
        total += inner
    return total


def traced_flops_per_device(traced: Any, num_devices: int) -> float:
    """Per-device matmul FLOPs of a `jax.jit(...).trace(...)` result on `num_devices` devices."""
    return jaxpr_flops(traced.jaxpr.jaxpr) / num_devices
