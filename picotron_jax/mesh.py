"""Build the 5-axis device mesh `pipe, data, context, expert, tensor` (outermost to innermost).

Innermost axes get neighbouring devices, so `tensor` (the chattiest axis) rides the fastest links.
All five axes always exist (size 1 where unused) so partition specs never change shape.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from picotron_jax.config import MESH_AXES, MeshConfig, resolve_mesh_shape
from picotron_jax.errors import UserError


def run_devices(mesh_cfg: MeshConfig) -> list[jax.Device]:
    """The devices a run uses: all visible ones, or the first `mesh.num_devices`."""
    devices = jax.devices()
    n = mesh_cfg.num_devices
    if n < 0 or n > len(devices):
        raise UserError(
            f"config field 'mesh.num_devices' = {n}: this machine has {len(devices)} visible device(s); "
            f"use 0 (all) or a number from 1 to {len(devices)}"
        )
    return devices[:n] if n else devices


def build_mesh(mesh_cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    devices = devices if devices is not None else run_devices(mesh_cfg)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware order on GPU/TPU; a plain reshape on CPU
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - any topology mismatch: fall back to device order
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
