"""Compile-only memory estimate of the train step, per device (MaxText's estimator, in spirit).

The step is lowered against abstract inputs (ShapeDtypeStructs carrying the run's shardings) and
compiled, never run: no parameter is allocated. XLA's buffer assignment (`memory_analysis()`)
gives per-device arguments (the train state and the batch), outputs (the new state: aliased to
the donated arguments), temporaries (gradients, activations kept for the backward pass, scratch)
and generated code. Parameters and optimizer state are split off the arguments from their
shapes and shardings; gradients (fp32, laid out like the parameters) are split off the
temporaries the same way. Peak = arguments + temporaries + outputs not aliased to arguments.

The figures are those of the backend that compiled the step: for a mesh larger than the machine,
`picotron-jax memory` compiles for virtual XLA:CPU devices, whose fusion and buffer reuse differ
from a GPU's or TPU's (typically by tens of percent in temporaries; state bytes are exact).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from picotron_jax.config import Config
from picotron_jax.memory.flops import traced_flops_per_device
from picotron_jax.mesh import describe
from picotron_jax.observe.hlo import collective_bytes
from picotron_jax.parallel.sharding import MeshRules, bytes_per_device
from picotron_jax.run import build_run
from picotron_jax.train.state import StateSetup


@dataclass
class MemoryEstimate:
    mesh: str
    devices: int
    platform: str
    precision: str
    remat: str
    grad_accum: int  # microbatches per step (pipeline.microbatches when mesh.pipe > 1)
    zero_stage: int
    params_bytes: int  # per device, as stored (fp32 master weights)
    opt_state_bytes: int
    other_state_bytes: int  # step counter, loss scale
    batch_bytes: int
    grads_bytes: int  # fp32 gradients laid out like the parameters (inside the temporaries)
    activations_bytes: int  # temporaries minus gradients: activations saved for backward + scratch
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int
    peak_bytes: int
    flops: float  # matmul FLOPs per device, loops counted by trip count; recomputation included (memory/flops.py)
    collective_bytes: int  # per step and device, all kinds

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def abstract_inputs(cfg: Config, rules: MeshRules, setup: StateSetup) -> tuple[Any, dict]:
    """ShapeDtypeStructs with the run's shardings for (state, batch): what the step is compiled for."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         setup.abstract, setup.shardings)
    B, T = cfg.train.global_batch, cfg.train.seq_len
    sharding = rules.batch_sharding()
    batch = {"inputs": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding),
             "targets": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding),
             "mask": jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=sharding)}
    return state, batch


def compile_train_step(cfg: Config, devices: list) -> tuple[Any, MeshRules, StateSetup, float]:
    """Validate, build the mesh and compile the train step for abstract inputs (nothing runs).
    Returns the compiled step, rules, state setup and the step's matmul FLOPs per device."""
    run = build_run(cfg, data=False, devices=devices)
    state, batch = abstract_inputs(cfg, run.rules, run.setup)
    traced = run.train_step.trace(state, batch)
    return traced.lower().compile(), run.rules, run.setup, traced_flops_per_device(traced, len(devices))


def estimate_from_compiled(cfg: Config, compiled: Any, rules: MeshRules, setup: StateSetup,
                           flops: float = float("nan")) -> MemoryEstimate:
    m = compiled.memory_analysis()
    params = bytes_per_device(setup.abstract.params, setup.shardings.params)
    opt = bytes_per_device(setup.abstract.opt_state, setup.shardings.opt_state)
    other = bytes_per_device((setup.abstract.step, setup.abstract.loss_scale, setup.abstract.spike),
                             (setup.shardings.step, setup.shardings.loss_scale, setup.shardings.spike))
    f32_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), setup.abstract.params)
    grads = bytes_per_device(f32_params, setup.shardings.params)
    argument, output, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    temp = m.temp_size_in_bytes
    return MemoryEstimate(
        mesh=describe(rules.mesh), devices=rules.mesh.size, platform=rules.mesh.devices.flat[0].platform,
        precision=setup.policy.describe(), remat=cfg.memory.remat, grad_accum=cfg.pipeline.microbatches if rules.mesh.shape["pipe"] > 1 else cfg.train.grad_accum,
        zero_stage=cfg.train.zero_stage, params_bytes=params, opt_state_bytes=opt, other_state_bytes=other,
        batch_bytes=max(argument - params - opt - other, 0), grads_bytes=min(grads, temp),
        activations_bytes=max(temp - grads, 0), temp_bytes=temp, argument_bytes=argument, output_bytes=output,
        alias_bytes=alias, code_bytes=m.generated_code_size_in_bytes,
        peak_bytes=argument + temp + max(output - alias, 0),
        flops=flops,
        collective_bytes=sum(collective_bytes(compiled.as_text()).values()),
    )


def estimate_memory(cfg: Config, devices: list) -> MemoryEstimate:
    compiled, rules, setup, flops = compile_train_step(cfg, devices)
    return estimate_from_compiled(cfg, compiled, rules, setup, flops)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_estimate(e: MemoryEstimate) -> str:
    rows = [
        ("parameters", e.params_bytes, "fp32 master weights, this device's shards"),
        ("optimizer state", e.opt_state_bytes, "Adam moments (+ counters)"),
        ("other state", e.other_state_bytes, "step, loss scale"),
        ("batch", e.batch_bytes, "tokens, targets, mask"),
        ("gradients", e.grads_bytes, "fp32, laid out like the parameters (temporary)"),
        ("activations/temporaries", e.activations_bytes, "saved for the backward pass + scratch"),
        ("code", e.code_bytes, "generated code"),
    ]
    lines = [f"train step on {e.devices} {e.platform} device(s), mesh {e.mesh} | {e.precision} | remat {e.remat} | "
             f"grad_accum {e.grad_accum} | ZeRO-{e.zero_stage}",
             "per device:"]
    lines += [f"  {name:<24} {mib(value):>14}   {note}" for name, value, note in rows]
    lines.append(f"  {'peak (estimated)':<24} {mib(e.peak_bytes):>14}   arguments {mib(e.argument_bytes)} + "
                 f"temporaries {mib(e.temp_bytes)} + unaliased outputs {mib(max(e.output_bytes - e.alias_bytes, 0))}")
    lines.append(f"  matmul FLOPs per device {e.flops:.4g} (recomputation included); collective bytes per step "
                 f"{e.collective_bytes:,}")
    return "\n".join(lines)
