"""One FFN layer of bench-moe-32m, forward + backward, on one device: dense SwiGLU (width 1408) vs the MoE
block (8 experts of width 704, top-2) in capacity (1.25) and dropless mode, the latter with its CPU row-block
grouped matmul and with `ragged_dot` (models/moe_grouped.py). Medians of 5 runs, in one process.

Usage: .venv/bin/python benchmarks/moe_layer_micro.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.config import MoEConfig
from picotron_jax.models import moe, moe_grouped
from picotron_jax.models.linear import project
from picotron_jax.models.llama import LOCAL_OPS

B, T, D, E, K, F = 8, 256, 512, 8, 2, 704


def dense_ffn(p, h):
    gate, up = project("btd,df->btf", h, p["w_gate"]), project("btd,df->btf", h, p["w_up"])
    return project("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])


def median_ms(fn, *args) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    k = jax.random.split(jax.random.key(0), 5)
    experts = {"router": 0.02 * jax.random.normal(k[0], (D, E)),
               "w_gate": 0.02 * jax.random.normal(k[1], (E, D, F)), "w_up": 0.02 * jax.random.normal(k[2], (E, D, F)),
               "w_down": 0.02 * jax.random.normal(k[3], (E, F, D))}
    dense = {"w_gate": 0.02 * jax.random.normal(k[1], (D, K * F)), "w_up": 0.02 * jax.random.normal(k[2], (D, K * F)),
             "w_down": 0.02 * jax.random.normal(k[3], (K * F, D))}
    h = jax.random.normal(k[4], (B, T, D))

    def grad_of(fn):
        return jax.grad(lambda p, h: jnp.sum(fn(p, h)))

    print(f"{'dense SwiGLU':24s} {median_ms(grad_of(dense_ffn), dense, h):8.1f} ms", flush=True)
    chosen = moe.grouped_swiglu
    for label, dispatch, grouped in (("capacity", "capacity", chosen), ("dropless, row blocks", "dropless",
                                     moe_grouped.block_swiglu), ("dropless, ragged_dot", "dropless",
                                     moe_grouped.ragged_swiglu)):
        moe.grouped_swiglu = grouped  # the name models/moe.py's dropless_experts calls
        cfg = MoEConfig(num_experts=E, top_k=K, dispatch=dispatch, capacity_factor=1.25)
        ms = median_ms(grad_of(lambda p, h: moe.moe_ffn(p, h, cfg, LOCAL_OPS)[0]), experts, h)
        print(f"{'MoE ' + label:24s} {ms:8.1f} ms", flush=True)
    moe.grouped_swiglu = chosen


if __name__ == "__main__":
    main()
