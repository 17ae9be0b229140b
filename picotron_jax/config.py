"""Typed run configuration: dataclasses per section, YAML loading, `section.key=value` overrides.

Levanter-style nested configs instead of MaxText's flat namespace: every field has a type and a
default, and `validate` stops a run before any work with one message naming the field, its value
and what would be valid (config_checks.py).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from picotron_jax.errors import UserError

from picotron_jax.config_sections import (  # noqa: F401  (re-exported: callers import sections from config)
    MESH_AXES,
    ModelConfig,
    MoEConfig,
    MeshConfig,
    TrainConfig,
    PIPELINE_SCHEDULES,
    PipelineConfig,
    OptimizerConfig,
    DataConfig,
    CHECKPOINT_CODECS,
    CHECKPOINT_QUANTIZE,
    CheckpointConfig,
    LoggingConfig,
    EvalConfig,
    GenerateConfig,
    FAULT_PHASES,
    NAN_SITES,
    SPIKE_KINDS,
    FaultsConfig,
    ProfileConfig,
    MonitorConfig,
    BenchConfig,
    PRECISION_MODES,
    MATMUL_PRECISIONS,
    PrecisionConfig,
    MemoryConfig,
    CLUSTERS,
    DistributedConfig,
    DebugConfig,
)
from picotron_jax.config_sections import CURRICULUM_KINDS, CURRICULUM_PACINGS, CurriculumConfig  # noqa: F401
from picotron_jax.config_sections import META_TASKS, MetaConfig  # noqa: F401



@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict[str, Any] | Any) -> "Config":
        """A copy with some fields changed, checked like a YAML file: `cfg.replace(train={"steps": 50},
        optimizer={"lr": 1e-3})`; a section may also be given as a whole dataclass."""
        raw = self.to_dict()
        for name, changes in sections.items():
            if name not in raw:
                raise UserError(f"unknown config section '{name}'; sections: {', '.join(sorted(raw))}")
            if dataclasses.is_dataclass(changes):
                changes = dataclasses.asdict(changes)
            if not isinstance(changes, dict):
                raise UserError(f"config section '{name}' must be given as a dict of fields, got {changes!r}")
            raw[name] = {**raw[name], **changes}
        return config_from_dict(raw)

    def with_overrides(self, overrides: list[str]) -> "Config":
        """A copy with `section.key=value` overrides applied (as on the command line)."""
        return config_from_dict(_merge(self.to_dict(), parse_overrides(overrides)))

    def validate(self, num_devices: int | None = None) -> dict[str, int]:
        """Every cross-field check the CLI runs (config_checks.py), against `num_devices` (default: the
        devices the run would use); returns the resolved mesh sizes."""
        from picotron_jax.config_checks import validate
        from picotron_jax.mesh import run_devices

        return validate(self, len(run_devices(self.mesh)) if num_devices is None else num_devices)


# ----------------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one leaf value against its declared type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(typ) is list:  # list[str]: a YAML list, or "a,b" as a shorthand
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(typ)
            return [_coerce(x, item, f"{where}[{i}]") for i, x in enumerate(value)]
    elif typ is dict:  # list[dict]: entries checked by the section's own code (data.mixture)
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - all leaves are bool/int/float/str/list
        raise TypeError(f"unsupported config type {typ} at {where}")
    name = getattr(typ, "__name__", str(typ))
    raise UserError(f"config field '{where}' = {value!r}: expected {name}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config section '{prefix}' must be a mapping, got {raw!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise UserError(
            f"unknown config key '{where}'; valid keys{' in ' + prefix if prefix else ''}: "
            + ", ".join(sorted(types_))
        )
    kwargs = {}
    for name, typ in types_.items():
        if name not in raw:
            continue
        where = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, raw[name], where)
        else:
            kwargs[name] = _coerce(raw[name], typ, where)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.steps=10", "mesh.data=4"]` -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like section.key=value (e.g. train.steps=10)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"override key '{key}' must be section.key (e.g. mesh.tensor=2)")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        nested.setdefault(parts[0], {})[parts[1]] = parsed
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


PRESETS_DIR = Path(__file__).resolve().parents[1] / "meshes"


def preset_path(path_or_preset: str | Path) -> Path:
    """A YAML file's path, or a preset's name ('single', 'tp2-dp4') -> meshes/<name>.yaml."""
    path = Path(path_or_preset)
    if path.is_file():
        return path
    name = str(path_or_preset)
    if "/" not in name and not name.endswith((".yaml", ".yml")) and (PRESETS_DIR / f"{name}.yaml").is_file():
        return PRESETS_DIR / f"{name}.yaml"
    names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))) or "none found"
    raise UserError(f"config file '{path}' does not exist; give a YAML path or a preset name ({names})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (a path or a preset name from meshes/), apply `section.key=value` overrides, build typed
    dataclasses. Checks every field's type; `Config.validate` runs the cross-field checks."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = preset_path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file '{path}' must hold a mapping of sections (model:, mesh:, train:, ...), "
                            f"got a {type(raw).__name__}")
    raw = _merge(raw, parse_overrides(overrides or []))
    return _build(Config, raw, "")


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# -------------------------------------------------------------------------------- validation


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the one -1 filled in; errors name both numbers when they do not fit."""
    sizes = mesh.axis_sizes()
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise UserError(f"config field 'mesh.{axis}' = {size}: must be a positive size or -1 (fill)")
    fills = [a for a, s in sizes.items() if s == -1]
    if len(fills) > 1:
        raise UserError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in fills)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fills:
        if num_devices % fixed:
            raise UserError(
                f"mesh.{fills[0]}=-1 cannot fill {num_devices} devices: the other axes multiply to {fixed}, "
                f"which does not divide {num_devices}"
            )
        sizes[fills[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        if mesh.num_devices and mesh.num_devices == num_devices:  # the preset limits the devices: the real cause
            raise UserError(
                f"mesh {shape} has {product} devices but config field 'mesh.num_devices' = {mesh.num_devices} "
                f"limits the run to {num_devices}; set mesh.num_devices={product} (or 0: all visible devices), or "
                f"make the axis sizes multiply to {num_devices}"
            )
        raise UserError(
            f"mesh {shape} has {product} devices but the run uses {num_devices}; "
            f"make the axis sizes multiply to {num_devices} (or set one axis to -1); on a CPU-only machine "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={product} gives {product} virtual devices"
        )
    return sizes
