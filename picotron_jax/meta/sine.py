"""Sinusoid regression (Finn et al. 2017), the classic meta-learning sanity check, and its small MLP.

Task: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; k support points to adapt on,
k_query held-out points of the same sinusoid to score the adapted model. Task batch `index` is a pure
function of (seed, index). The MLP (1 -> H -> H -> 1, ReLU) is a pytree of arrays; `param_specs` lays it
out on the mesh like the transformer: its hidden units over `tensor`, and with ZeRO-3 over `data` too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def sample_tasks(seed: int, index: int, num_tasks: int, k_support: int, k_query: int) -> dict:
    """Task batch `index`: {"support": {"x", "y"}, "query": {"x", "y"}}, each [num_tasks, k, 1] float32."""
    rng = np.random.default_rng([seed, index])
    amp = rng.uniform(0.1, 5.0, (num_tasks, 1, 1))
    phase = rng.uniform(0.0, np.pi, (num_tasks, 1, 1))
    x = rng.uniform(-5.0, 5.0, (num_tasks, k_support + k_query, 1))
    y = amp * np.sin(x - phase)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return {"support": {"x": x[:, :k_support], "y": y[:, :k_support]},
            "query": {"x": x[:, k_support:], "y": y[:, k_support:]}}


def init_mlp(seed: int, hidden: int, dtype=jnp.float32) -> dict:
    """Glorot-initialised MLP 1 -> hidden -> hidden -> 1 (He initialisation makes inner SGD at lr 0.01
    diverge on inputs of scale 5)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)

    def dense(key, fan_in, fan_out):
        return jax.random.normal(key, (fan_in, fan_out), dtype) * jnp.sqrt(2.0 / (fan_in + fan_out)).astype(dtype)

    return {"w1": dense(k1, 1, hidden), "b1": jnp.zeros((hidden,), dtype),
            "w2": dense(k2, hidden, hidden), "b2": jnp.zeros((hidden,), dtype),
            "w3": dense(k3, hidden, 1), "b3": jnp.zeros((1,), dtype)}


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """The MLP on inputs x [..., 1] (any leading shape): outputs [..., 1]."""
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    h = jax.nn.relu(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def mse(params: dict, batch: dict) -> jax.Array:
    """Mean squared error of the MLP on a batch {"x", "y"} of points (any leading shape)."""
    return jnp.mean((mlp(params, batch["x"]) - batch["y"]) ** 2)


def param_specs(hidden: int, tensor: int, data: int, zero_stage: int) -> dict:
    """Partition specs: hidden units over `tensor` (w1 by columns, w2 by rows, w3 by rows), and with ZeRO-3
    the other dimension of w2 (and the hidden vectors) over `data` as well."""
    t = "tensor" if tensor > 1 and hidden % tensor == 0 else None
    d = "data" if zero_stage == 3 and data > 1 and hidden % (data * (tensor if t else 1)) == 0 else None
    both = tuple(a for a in (d, t) if a) or None
    return {"w1": P(None, both), "b1": P(both), "w2": P(t, d), "b2": P(d), "w3": P(both, None), "b3": P()}
