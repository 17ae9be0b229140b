"""Weight projections `y = einsum(spec, x, w)` with a hand-written VJP.

The math is plain autodiff's; the point is the *form* of the backward dots. On XLA:CPU (jaxlib
0.10), dots whose operands are in canonical layout run in the fast YNNPACK kernels, while the
weight-gradient dot that autodiff emits (contracting over batch and time, dimension 0 of both
operands) falls back to slower Eigen dots or gets a transposing copy fused in front of it.
Writing dW = einsum("x,y->w", x, dy) directly in the weight's own layout measured 1.29x
faster for the whole bench-32m train step (benchmarks/README.md). On GPU/TPU it is neutral.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from picotron_jax.compat import varying_axes


def _parse(spec: str) -> tuple[str, str, str]:
    inputs, y = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    return x, w, y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w), e.g. spec "btd,dhk->bthk" for a query projection.

    Computed in the weight's dtype (a module's precision, train/precision.py) and returned in x's
    dtype (the residual stream's); both casts vanish when the dtypes agree."""
    return _einsum_in_weight_dtype(spec, x, w)


def _einsum_in_weight_dtype(spec, x, w):
    return jnp.einsum(spec, x.astype(w.dtype), w).astype(x.dtype)


def _project_fwd(spec, x, w):
    return _einsum_in_weight_dtype(spec, x, w), (x, w)


def _project_bwd(spec, residuals, dy):
    x, w = residuals
    xs, ws, ys = _parse(spec)
    dy = dy.astype(w.dtype)
    dx = jnp.einsum(f"{ys},{ws}->{xs}", dy, w)  # [.., in]: dy against the weight
    dw = jnp.einsum(f"{xs},{ys}->{ws}", x.astype(w.dtype), dy)  # weight layout, contracting over batch and time
    return sum_to_type(dx, x), sum_to_type(dw, w)


def sum_to_type(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside a shard_map (pipeline stages, expert and vocabulary shards): psum a gradient over the mesh axes it varies on but
    its primal does not, as autodiff would (dx of a projection split over `tensor`). Outside, a cast."""
    extra = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
    return (jax.lax.psum(grad, extra) if extra else grad).astype(primal.dtype)


project.defvjp(_project_fwd, _project_bwd)
