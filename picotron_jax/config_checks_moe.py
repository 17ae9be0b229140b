"""Validation of the `moe` section: the fields against the model and the mesh, and the conditions for MoE
layers in pipeline stages (config_checks.py calls `validate_moe`)."""

from __future__ import annotations

from picotron_jax.config import ModelConfig, MoEConfig
from picotron_jax.errors import need as _need


def validate_moe(e: MoEConfig, m: ModelConfig, sizes: dict[str, int]) -> None:
    """MoE fields, checked against the model and the resolved mesh sizes."""
    _need(e.num_experts >= 0, f"config field 'moe.num_experts' = {e.num_experts}: must be >= 0 (0 = dense model)")
    if not e.enabled:
        return
    E, ep, tp = e.num_experts, sizes["expert"], sizes["tensor"]
    _need(1 <= e.top_k <= E,
          f"config field 'moe.top_k' = {e.top_k}: must be between 1 and moe.num_experts = {E}")
    _need(E % ep == 0,
          f"config field 'moe.num_experts' = {E}: must be divisible by mesh.expert = {ep} (each expert rank "
          f"holds num_experts / mesh.expert experts)")
    _need(e.dispatch in ("capacity", "dropless"),
          f"config field 'moe.dispatch' = {e.dispatch!r}: valid values are 'capacity', 'dropless'")
    _need(e.dispatch != "capacity" or e.capacity_factor > 0,
          f"config field 'moe.capacity_factor' = {e.capacity_factor}: must be > 0 in capacity mode "
          f"(or set moe.dispatch=dropless)")
    _need(e.score in ("softmax", "sigmoid"),
          f"config field 'moe.score' = {e.score!r}: valid values are 'softmax', 'sigmoid'")
    _need(e.expert_size >= 0, f"config field 'moe.expert_size' = {e.expert_size}: must be >= 0 "
                              f"(0 = model.intermediate_size)")
    size = e.expert_size or m.intermediate_size
    _need(size % tp == 0,
          f"config field 'moe.expert_size' = {size}: must be divisible by mesh.tensor = {tp}")
    _need(e.shared_experts >= 0, f"config field 'moe.shared_experts' = {e.shared_experts}: must be >= 0")
    _need(0 <= e.first_dense_layers < m.num_layers,
          f"config field 'moe.first_dense_layers' = {e.first_dense_layers}: must be in [0, model.num_layers = "
          f"{m.num_layers})")
    _need(e.every_n_layers >= 1, f"config field 'moe.every_n_layers' = {e.every_n_layers}: must be >= 1")
    rest = m.num_layers - e.first_dense_layers
    _need(rest % e.every_n_layers == 0,
          f"config field 'moe.every_n_layers' = {e.every_n_layers}: must divide model.num_layers - "
          f"moe.first_dense_layers = {rest} (the layers after the dense ones repeat [MoE, dense x (N-1)])")
    for name in ("aux_loss", "router_z_loss", "bias_update_rate"):
        value = getattr(e, name)
        _need(value >= 0, f"config field 'moe.{name}' = {value}: must be >= 0 (0 = off)")
    if sizes["pipe"] > 1 and E > 0:
        validate_moe_stages(e, m, sizes)


def validate_moe_stages(e: MoEConfig, m: ModelConfig, sizes: dict[str, int]) -> None:
    """MoE layers in pipeline stages (parallel/pipeline.py): every stage must hold the same layer structure."""
    _need(e.first_dense_layers == 0,
          f"config field 'moe.first_dense_layers' = {e.first_dense_layers}: pipeline stages (mesh.pipe = "
          f"{sizes['pipe']}) all run one program over equal layer stacks, so a dense prefix on the first stage only "
          f"is not supported (missing: per-stage stacks of different shapes); use moe.every_n_layers for dense "
          f"layers (e.g. 2: [MoE, dense] repeated), or set mesh.pipe=1")
