"""Model FLOPs per token and the peak they are compared against (MFU).

flops_per_token = 6·N + 6·L·T·d (DESIGN.md; Kaplan et al. 2020 and the PaLM appendix B):
N = parameters without the input embedding (a tied table still counts once, as the LM head),
L layers, T sequence length, d model width. 6·L·T·d is causal attention: the 12·L·T·d of q·k and
p·v over all T keys (forward and backward, PaLM's 12·L·H·Q·T) halved, as the causal mask keeps half.
MoE layers count their *active* parameters: the router, top_k routed experts and the shared ones.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.config import ModelConfig, MoEConfig

# Dense bf16 peak FLOP/s per chip (vendor datasheets); matched as substrings of device_kind.
DEVICE_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}
PEAK_CACHE = Path(os.path.expanduser("~/.cache/picotron_jax/cpu_peak.json"))


def non_embedding_params(cfg: ModelConfig, moe: MoEConfig | None = None) -> int:
    """Parameters a token passes through, without the input embedding (MoE: the active ones)."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, G, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.vocab_size
    per_layer = D * H * K * 2 + D * G * K * 2 + 3 * D * F + 2 * D  # q, o, k, v, mlp, norms
    total = L * per_layer + D + V * D  # + final norm + LM head (the table itself when tied)
    if moe is not None and moe.enabled:
        num_moe = (L - moe.first_dense_layers) // moe.every_n_layers
        Fe = moe.expert_size or F
        active_mlp = D * moe.num_experts + 3 * D * Fe * (moe.top_k + moe.shared_experts)  # router + experts
        total += num_moe * (active_mlp - 3 * D * F)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, moe: MoEConfig | None = None) -> float:
    return 6.0 * non_embedding_params(cfg, moe) + 6.0 * cfg.num_layers * seq_len * cfg.hidden_size


def _cpu_key() -> str:
    return f"{platform.processor() or platform.machine()}|{os.cpu_count()}|jax{jax.__version__}"


def measure_matmul_peak(sizes=(1024, 2048, 4096), repeats: int = 5) -> dict:
    """FLOP/s of a jitted f32 `a @ b` on the default device, best of `repeats`, for each size.

    The peak used for MFU is the largest size's figure ("a large f32 matmul", DESIGN.md)."""
    results = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        mm = jax.jit(jnp.matmul)
        mm(a, b).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            mm(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        results[str(n)] = 2.0 * n**3 / best
    return {"peak_flops": results[str(max(sizes))], "by_size": results, "key": _cpu_key()}


def cached_cpu_peak(measure_if_missing: bool = True) -> float | None:
    """This host's measured f32 matmul peak, from the cache `bench --peak` writes."""
    try:
        data = json.loads(PEAK_CACHE.read_text())
        if data.get("key") == _cpu_key():
            return float(data["peak_flops"])
    except (OSError, ValueError, KeyError):
        pass
    if not measure_if_missing:
        return None
    return save_cpu_peak(measure_matmul_peak())["peak_flops"]


def save_cpu_peak(result: dict) -> dict:
    PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = PEAK_CACHE.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(PEAK_CACHE)
    return result


def run_peak_flops(devices: list[jax.Device], override: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of all devices the run uses, and where the number came from."""
    if override > 0:
        return override, "logging.peak_flops"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # virtual CPU devices share the host's cores: the host peak counts once per process
        hosts = len({d.process_index for d in devices})
        return cached_cpu_peak() * hosts, "measured CPU matmul peak (picotron-jax bench --peak)"
    for name, peak in DEVICE_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak * len(devices), f"datasheet bf16 peak of {name}"
    return float(np.nan), f"unknown device kind {kind!r}: set logging.peak_flops"
