"""All-to-all bytes per MoE layer per step, from the compiled train step's HLO, against the dispatch formula.

Per device and MoE layer, the step runs 4 all_to_alls of the same size (tokens there and back in the
forward pass, their gradients in the backward pass). With b sequences of T tokens per device, top-k,
width D, fp32 (4 bytes):

* capacity: the [b, E, C, D] buffer, C = ceil(T * k / E * capacity_factor): b * E * C * D * 4
  (= tokens x k x D x 4 scaled by the capacity factor, up to the rounding of C);
* dropless, padded fallback (parallel/expert.py): [ep, M, D] with M = b * T * k: ep x tokens x k x D x 4,
  plus the [ep, E/ep] int32 counts once (forward only).

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/moe_alltoall.py [preset ...]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax

from picotron_jax.config import load_config
from picotron_jax.observe.hlo import collective_stats
from picotron_jax.train.state import init_train_state
from picotron_jax.run import build_run

MESHES = Path(__file__).resolve().parents[1] / "meshes"
PRESETS = ["moe-ep8", "moe-ep4-tp2", "moe-dropless-dp2-ep4"]


def expected_per_layer(cfg, mesh_shape: dict) -> int:
    m = cfg.moe
    ep = mesh_shape["expert"]
    b = cfg.train.global_batch // cfg.train.grad_accum // (mesh_shape["data"] * ep)
    T, D, E, k = cfg.train.seq_len, cfg.model.hidden_size, m.num_experts, m.top_k
    if m.dispatch == "capacity":
        C = max(1, min(T, math.ceil(T * k / E * m.capacity_factor)))
        return 4 * b * E * C * D * 4
    return 4 * ep * b * T * k * D * 4 + ep * (E // ep) * 4


def main(presets: list[str]) -> None:
    print(f"{'preset':24s} {'mesh':28s} {'dispatch':9s} {'measured/layer':>15s} {'expected/layer':>15s} "
          f"{'4 x tokens x k x D x 4':>23s} {'ratio':>6s}")
    for name in presets:
        cfg = load_config(MESHES / f"{name}.yaml")
        run = build_run(cfg)
        state = init_train_state(cfg, run.setup)
        hlo = run.train_step.lower(state, run.batch(0)).compile().as_text()
        stats = collective_stats(hlo)
        layers = len(range(cfg.moe.first_dense_layers, cfg.model.num_layers, cfg.moe.every_n_layers))
        measured = stats["bytes"].get("all-to-all", 0) // layers
        shape = dict(run.mesh.shape)
        b = cfg.train.global_batch // (shape["data"] * shape["expert"])
        ideal = 4 * b * cfg.train.seq_len * cfg.moe.top_k * cfg.model.hidden_size * 4  # 4 exchanges, fp32
        mesh = " x ".join(f"{a}={s}" for a, s in shape.items() if s > 1)
        print(f"{name:24s} {mesh:28s} {cfg.moe.dispatch:9s} {measured:>15,d} {expected_per_layer(cfg, shape):>15,d} "
              f"{ideal:>23,d} {measured / ideal:6.3f}", flush=True)
        jax.clear_caches()


if __name__ == "__main__":
    main(sys.argv[1:] or PRESETS)
