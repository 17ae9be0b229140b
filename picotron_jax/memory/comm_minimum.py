"""The least collective traffic a layout needs per train step, in closed form, against the compiled HLO's.

Per device and step, in `observe/hlo.py`'s size convention (nccl-tests' data size S: an all-reduce counts
its tensor, an all-gather its output, a reduce-scatter its input, an all-to-all / collective-permute its
tensor), and as wire bytes (what one device sends on a ring: all-reduce 2(n-1)/n S, all-gather,
reduce-scatter and all-to-all (n-1)/n S, collective-permute S; n the group size; Patarasuk & Yuan 2009).

Terms (b = sequences per device, t = tokens per sequence per device, D width, L layers, fp32 = 4 bytes):

* DP gradient reduce: one all-reduce of this device's gradient (its parameters' bytes before any data
  split). ZeRO-1: a reduce-scatter of it and an all-gather of the updated parameters; ZeRO-3 (FSDP): the
  reduce-scatter and two all-gathers (forward, and again in the backward; Rajbhandari et al. 2020 sec. 5).
* TP (Megatron, Shoeybi et al. 2019 sec. 3): two all-reduces of [b, t, D] per layer forward (attention and
  MLP outputs) and two backward (their inputs' gradients), plus the vocabulary-parallel embedding's output
  (forward) and the LM head input's gradient (backward): (4L + 2) b t D.
* CP ring (Liu et al. 2023): per layer c - 1 hops of this device's K and V chunk in the forward pass (G/tp
  KV heads each); the backward, keeping the chunks it received, sends their gradients back the same number
  of hops: 4 (c - 1) b t (G/tp) K per layer.
* EP: four all-to-alls of the routed tokens per MoE layer (there and back, forward and backward),
  b T k D each (dropless), or the capacity buffers b E C D (capacity mode).

Scalars (the loss, the gradient norm, token counts) are ignored: a few bytes. Pipeline boundaries are
not modelled (the SPMD pipeline's collective-permutes carry every stage's buffer each tick).
"""

from __future__ import annotations

import math
from typing import Any

import jax

from picotron_jax.config import Config
from picotron_jax.models.moe import expert_capacity
from picotron_jax.observe.hlo import computation_runs, device_groups, instruction_collective, parse_hlo

WIRE_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
               "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
               "collective-permute": lambda n: 1.0}


BATCH_AXES = ("data", "context", "expert")  # gradients of a parameter are summed over those it is not split on


def gradient_bytes(setup: Any) -> dict[int, int]:
    """{reduction group size: fp32 bytes} of this device's gradients before their reduction: each parameter's
    shard (any split over `data`, ZeRO-3's, undone), grouped by how many devices sum it: the batch axes the
    parameter is not split over (experts split over `expert` are summed over data x context only)."""
    out: dict[int, int] = {}
    for sds, sh in zip(jax.tree.leaves(setup.abstract.params), jax.tree.leaves(setup.shardings.params)):
        split = {a for axes in sh.spec if axes is not None for a in (axes if isinstance(axes, tuple) else (axes,))}
        nbytes = 4 * math.prod(sh.shard_shape(sds.shape)) * (sh.mesh.shape["data"] if "data" in split else 1)
        group = math.prod(sh.mesh.shape[a] for a in BATCH_AXES if a not in split or a == "data")
        out[group] = out.get(group, 0) + nbytes
    return out


def minimum_terms(cfg: Config, mesh_shape: dict[str, int], grad_bytes: dict[int, int]) -> list[tuple[str, str, int, int]]:
    """[(term, collective kind, bytes S, group size n)] of the least traffic for this layout."""
    m, tr = cfg.model, cfg.train
    d, c, e, t_ = (mesh_shape[a] for a in ("data", "context", "expert", "tensor"))
    if mesh_shape["pipe"] > 1:
        raise ValueError("config field 'mesh.pipe' > 1: pipeline boundaries are not modelled; use pipe=1")
    b = tr.global_batch // (d * e)
    t = tr.seq_len // c
    D, L = m.hidden_size, m.num_layers
    terms = []
    for group, nbytes in sorted(grad_bytes.items()):  # {devices summing a gradient: its bytes}
        if group == 1:
            continue
        if tr.zero_stage == 0:
            terms.append((f"DP gradient all-reduce over {group}", "all-reduce", nbytes, group))
        else:
            terms.append((f"ZeRO gradient reduce-scatter over {group}", "reduce-scatter", nbytes, group))
            gathers = 1 if tr.zero_stage == 1 else 2
            terms.append((f"ZeRO parameter all-gather x{gathers}", "all-gather", gathers * nbytes, d))
    if t_ > 1:
        terms.append(("TP activation all-reduces", "all-reduce", (4 * L + 2) * b * t * D * 4, t_))
    if c > 1:
        G, K = max(m.num_kv_heads // t_, 1), m.resolved_head_dim
        terms.append(("CP K/V ring", "collective-permute", 4 * (c - 1) * b * t * G * K * 4 * L, 2))
    if cfg.moe.enabled and e > 1:
        mo = cfg.moe
        moe_layers = (L - mo.first_dense_layers) // mo.every_n_layers
        if mo.dispatch == "capacity":
            per = b * mo.num_experts * expert_capacity(tr.seq_len, mo.top_k, mo.num_experts, mo.capacity_factor) * D
        else:
            per = b * tr.seq_len * mo.top_k * D
        terms.append(("EP token all-to-alls", "all-to-all", 4 * per * 4 * moe_layers, e))
    return terms


def measured_collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """Per kind: bytes S (as observe/hlo.collective_bytes) and wire bytes (S x the ring factor of the
    instruction's own group size; no groups listed = all `num_devices`), per device and program execution."""
    comps, entry = parse_hlo(hlo_text)
    runs = computation_runs(comps, entry)
    out = {k: {"bytes": 0.0, "wire": 0.0} for k in WIRE_FACTOR}
    for name, times in runs.items():
        comp = comps[name]
        for ins in comp.instrs:
            hit = instruction_collective(ins, comp)
            if hit is None or hit[0] not in out:
                continue
            kind, nbytes = hit
            groups = device_groups(ins.raw_attrs)
            n = 2 if kind == "collective-permute" else max((len(g) for g in groups), default=0) or num_devices
            out[kind]["bytes"] += times * nbytes
            out[kind]["wire"] += times * nbytes * WIRE_FACTOR[kind](n)
    return out


def compare(cfg: Config, compiled: Any, setup: Any, mesh_shape: dict[str, int]) -> dict[str, Any]:
    """The minimum against the compiled step: per kind bytes, wire-byte totals and their ratio."""
    terms = minimum_terms(cfg, mesh_shape, gradient_bytes(setup))
    measured = measured_collectives(compiled.as_text(), math.prod(mesh_shape.values()))
    minimum = {k: 0.0 for k in WIRE_FACTOR}
    min_wire = 0.0
    for _, kind, nbytes, n in terms:
        minimum[kind] += nbytes
        min_wire += nbytes * WIRE_FACTOR[kind](n)
    wire = sum(v["wire"] for v in measured.values())
    return {"terms": terms, "minimum": minimum, "measured": {k: v["bytes"] for k, v in measured.items()},
            "minimum_wire": min_wire, "measured_wire": wire,
            "ratio": wire / min_wire if min_wire else (1.0 if wire == 0 else float("inf"))}


def compare_preset(cfg: Config, devices: list | None = None) -> dict[str, Any]:
    """Compile (never run) the train step of `cfg` and compare its collectives with the minimum. The
    monitor's per-layer statistics (a conditional branch taken every `monitor.layer_every` steps, which
    gathers sharded parameters) are switched off: they are not training traffic."""
    import dataclasses

    from picotron_jax.memory.estimate import compile_train_step

    cfg = dataclasses.replace(cfg, monitor=dataclasses.replace(cfg.monitor, layer_stats=False))
    devices = devices or jax.devices()[: cfg.mesh.num_devices or len(jax.devices())]
    compiled, rules, setup, _ = compile_train_step(cfg, devices)
    return compare(cfg, compiled, setup, dict(rules.mesh.shape))


__all__ = ["compare", "compare_preset", "gradient_bytes", "measured_collectives", "minimum_terms"]
