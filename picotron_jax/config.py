"""Typed run configuration: dataclasses per section, YAML loading, `section.key=value` overrides.

Levanter-style nested configs instead of MaxText's flat namespace: every field has a type and a
default, and `validate` stops a run before any work with one message naming the field, its value
and what would be valid.
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

MESH_AXES = ("pipe", "data", "context", "expert", "tensor")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    scan_unroll: int = 1  # layers per scan iteration: faster on CPU, longer compile

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (models/moe.py); num_experts = 0 keeps the model dense."""

    num_experts: int = 0  # E; 0 = dense model
    top_k: int = 2  # experts per token
    expert_size: int = 0  # MLP width of each expert; 0 -> model.intermediate_size
    score: str = "softmax"  # router scores: softmax (Switch/GShard) | sigmoid (DeepSeek-V3)
    normalize_top_k: bool = True  # rescale the k chosen weights to sum to 1
    shared_experts: int = 0  # always-on experts of expert_size each (DeepSeek), as one wider SwiGLU
    dispatch: str = "capacity"  # capacity (fixed buffers, overflow dropped) | dropless (sorted + ragged_dot)
    capacity_factor: float = 1.25  # capacity per expert per sequence = ceil(seq_len * top_k / E * factor)
    first_dense_layers: int = 0  # the first N layers keep the dense MLP
    every_n_layers: int = 1  # after those, layers first_dense_layers + i*N are MoE, the others dense
    aux_loss: float = 0.01  # Switch load-balancing loss coefficient; 0 = off
    router_z_loss: float = 0.0  # router z-loss coefficient (ST-MoE); 0 = off
    bias_update_rate: float = 0.0  # aux-loss-free balancing bias step (DeepSeek-V3); 0 = off

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class MeshConfig:
    pipe: int = 1
    data: int = -1
    context: int = 1
    expert: int = 1
    tensor: int = 1
    num_devices: int = 0  # 0 -> all visible devices; N -> the first N

    def axis_sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 0
    seq_len: int = 128
    global_batch: int = 16  # sequences per optimizer step
    grad_accum: int = 1  # microbatches per step (scanned)
    zero_stage: int = 0  # 0 = plain DP, 1 = optimizer state sharded, 3 = parameters too (FSDP)
    z_loss: float = 0.0  # coefficient of log(Z)^2 (PaLM)
    dtype: str = "float32"  # parameter and compute dtype
    context_zigzag: bool = True  # mesh.context > 1: device i holds sequence chunks i and 2c-1-i (balanced causal work)
    stop_at_step: int = 0  # save and exit cleanly after this step (a time-limited job); 0 = off


PIPELINE_SCHEDULES = ("none", "afab", "1f1b", "interleaved")


@dataclass
class PipelineConfig:
    """Pipeline parallelism over mesh.pipe (parallel/pipeline.py); `picotron-jax pipeline-schedule` prints it."""

    schedule: str = "none"  # none (mesh.pipe = 1) | afab | 1f1b | interleaved
    microbatches: int = 4  # m: microbatches per step flowing through the pipe
    virtual_stages: int = 2  # v: layer chunks per pipe rank, for schedule interleaved


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    decay_steps: int = 0  # 0 -> train.steps - warmup_steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" | text file | folder of text files | .jsonl | .parquet
    text_field: str = "text"  # field holding the text in .jsonl / .parquet rows
    tokenizer: str = "byte"  # "byte" | path to a Hugging Face tokenizer.json
    cache_dir: str = ""  # "" -> ~/.cache/picotron_jax/tokens


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" -> RUN_DIR/checkpoints
    every: int = 0  # steps between saves (and one at the end); 0 = never
    keep: int = 3  # newest checkpoints kept; 0 = all
    keep_every: int = 0  # steps: checkpoints at multiples of this are kept for good; 0 = none
    async_save: bool = True  # write in a background thread while training continues
    compression_level: int = 3  # zstd level of array chunks (1-22); 0 = uncompressed


@dataclass
class LoggingConfig:
    every: int = 10  # steps between log lines / metrics rows
    run_dir: str = "runs/latest"
    progress: bool = True  # progress bar on a terminal
    peak_flops: float = 0.0  # whole-run peak FLOP/s for MFU; 0 -> device table or measured CPU peak


@dataclass
class BenchConfig:
    steps: int = 5
    warmup: int = 2


PRECISION_MODES = ("auto", "fp32", "bf16", "fp16")
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclass
class PrecisionConfig:
    """Mixed precision (train/precision.py): fp32 master weights, per-module compute dtypes."""

    mode: str = "auto"  # auto (bf16 on TPU / Ampere+, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    overrides: str = ""  # "pattern:dtype,...", e.g. "head:fp32,layers.w_*:bf16" (fnmatch over module names)
    policy_file: str = ""  # per-module policy YAML written by `picotron-jax precision analyze`
    matmul: str = "default"  # f32 matmul precision on TF32-class hardware: default | high | highest
    loss_scale_init: float = 32768.0  # fp16: initial dynamic loss scale (2^15)
    loss_scale_growth_interval: int = 2000  # fp16: double the scale after this many finite steps
    promote_after: int = 3  # fp16: overflows attributed to one module before it runs in fp32; 0 = never


@dataclass
class MemoryConfig:
    """Rematerialisation and device allocator (train/remat.py, picotron_jax/memory/)."""

    remat: str = "none"  # none | full | dots | save_qkv | save_attn | names | offload_attn, or "full:2,none:2" per layer
    remat_names: str = ""  # remat=names: checkpoint_name tags to keep, e.g. "wq,wk,wv,attention"
    preallocate: bool = True  # GPU allocator: reserve memory up front (JAX's default); false = allocate on demand
    fraction: float = 0.0  # GPU allocator: fraction of device memory to preallocate; 0 = JAX's default (0.75)
    live_arrays: bool = True  # log the count and bytes of live device arrays each logging interval (leak check)


CLUSTERS = ("auto", "off", "slurm", "ompi", "mpi4py", "k8s", "tpu")


@dataclass
class DistributedConfig:
    """Several processes (hosts) through jax.distributed; see picotron_jax/distributed.py."""

    # auto (SLURM or Open MPI with >1 task, Cloud TPU, or the fields below) | off | slurm | ompi | mpi4py | k8s | tpu
    cluster: str = "auto"
    coordinator: str = ""  # host:port of process 0; "" -> from the cluster
    num_processes: int = 0  # 0 -> from the cluster
    process_id: int = -1  # -1 -> from the cluster
    local_device_ids: str = ""  # "0,1,2,3": accelerators of this process; "" -> JAX's choice
    init_timeout_s: int = 300  # how long processes wait for each other at start-up
    heartbeat_timeout_s: int = 60  # a process silent this long is declared lost; the others stop (exit 3)
    step_timeout_s: int = 0  # no step (nor checkpoint save) finished for this long: stop (exit 3); 0 = off
    shutdown_timeout_s: int = 60  # at the end, how long a process waits for the others to finish


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    else:  # pragma: no cover - all leaves are bool/int/float/str
        raise TypeError(f"unsupported config type {typ} at {where}")
    raise UserError(f"config field '{where}' = {value!r}: expected {typ.__name__}")


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (if given), apply overrides, build typed dataclasses. Does not validate the mesh."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist; presets live in meshes/ (e.g. meshes/single.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file '{path}' is not valid YAML: {exc}") from None
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
        raise UserError(
            f"mesh {shape} has {product} devices but the run uses {num_devices}; "
            f"make the axis sizes multiply to {num_devices} (or set one axis to -1); on a CPU-only machine "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={product} gives {product} virtual devices"
        )
    return sizes


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def validate_distributed(d: DistributedConfig) -> None:
    """Checks that need no devices: run before jax.distributed.initialize."""
    _need(d.cluster in CLUSTERS,
          f"config field 'distributed.cluster' = {d.cluster!r}: valid values are {', '.join(CLUSTERS)}")
    if d.coordinator:
        host, _, port = d.coordinator.rpartition(":")
        _need(bool(host) and port.isdigit() and 0 < int(port) < 65536,
              f"config field 'distributed.coordinator' = {d.coordinator!r}: must be host:port of process 0, "
              f"e.g. 10.0.0.1:1234")
    _need(d.num_processes >= 0,
          f"config field 'distributed.num_processes' = {d.num_processes}: must be >= 1 (or 0: from the cluster)")
    _need(d.process_id >= -1,
          f"config field 'distributed.process_id' = {d.process_id}: must be >= 0 (or -1: from the cluster)")
    _need(d.num_processes == 0 or d.process_id < d.num_processes,
          f"config field 'distributed.process_id' = {d.process_id}: must be below distributed.num_processes = "
          f"{d.num_processes}")
    ids = [x.strip() for x in d.local_device_ids.split(",")] if d.local_device_ids.strip() else []
    _need(all(x.isdigit() for x in ids),
          f"config field 'distributed.local_device_ids' = {d.local_device_ids!r}: must be comma-separated device "
          f"numbers, e.g. 0,1,2,3 (or empty: JAX's choice)")
    for name in ("init_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
        value = getattr(d, name)
        _need(value >= 1, f"config field 'distributed.{name}' = {value}: must be >= 1 (seconds)")
    _need(d.step_timeout_s >= 0, f"config field 'distributed.step_timeout_s' = {d.step_timeout_s}: must be >= 0 "
                                 f"(seconds; 0 = off)")


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
REMAT_POLICIES = ("none", "full", "dots", "save_qkv", "save_attn", "names", "offload_attn")


def parse_precision_overrides(text: str, where: str = "precision.overrides") -> list[tuple[str, str]]:
    """"head:fp32,layers.w_*:bf16" -> [("head", "float32"), ("layers.w_*", "bfloat16")] (order kept)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        pattern, _, dtype = item.rpartition(":")
        _need(bool(pattern) and dtype.strip() in DTYPE_NAMES,
              f"config field '{where}' = {text!r}: each entry must be pattern:dtype with dtype one of "
              f"{', '.join(DTYPE_NAMES)}, e.g. head:fp32,layers.w_*:bf16")
        out.append((pattern.strip(), DTYPE_NAMES[dtype.strip()]))
    return out


def parse_remat(text: str, num_layers: int) -> list[tuple[str, int]]:
    """"full" -> [("full", L)]; "full:2,none:2" -> consecutive layer segments; counts sum to L."""
    allowed = ", ".join(REMAT_POLICIES)
    items = [x.strip() for x in text.split(",") if x.strip()]
    _need(bool(items), f"config field 'memory.remat' = {text!r}: valid policies are {allowed}")
    if len(items) == 1 and ":" not in items[0]:
        items = [f"{items[0]}:{num_layers}"]
    segments = []
    for item in items:
        name, _, count = item.partition(":")
        _need(name in REMAT_POLICIES and count.isdigit() and int(count) > 0,
              f"config field 'memory.remat' = {text!r}: expected a policy ({allowed}) or per-layer segments "
              f"policy:count,... (e.g. full:2,none:2)")
        segments.append((name, int(count)))
    total = sum(c for _, c in segments)
    _need(total == num_layers,
          f"config field 'memory.remat' = {text!r}: the segments cover {total} layers but model.num_layers = "
          f"{num_layers}")
    return segments


def validate_precision(p: PrecisionConfig) -> None:
    _need(p.mode in PRECISION_MODES,
          f"config field 'precision.mode' = {p.mode!r}: valid values are {', '.join(PRECISION_MODES)}")
    _need(p.matmul in MATMUL_PRECISIONS,
          f"config field 'precision.matmul' = {p.matmul!r}: valid values are {', '.join(MATMUL_PRECISIONS)}")
    parse_precision_overrides(p.overrides)
    _need(not p.policy_file or Path(p.policy_file).expanduser().is_file(),
          f"config field 'precision.policy_file' = {p.policy_file!r}: no such file; write one with "
          f"`picotron-jax precision analyze --config ... --out FILE`")
    _need(p.loss_scale_init >= 1.0,
          f"config field 'precision.loss_scale_init' = {p.loss_scale_init}: must be >= 1")
    _need(p.loss_scale_growth_interval >= 1,
          f"config field 'precision.loss_scale_growth_interval' = {p.loss_scale_growth_interval}: must be >= 1")
    _need(p.promote_after >= 0, f"config field 'precision.promote_after' = {p.promote_after}: must be >= 0 (0 = never)")


def validate_memory(m: MemoryConfig, num_layers: int) -> None:
    segments = parse_remat(m.remat, num_layers)
    names = [x.strip() for x in m.remat_names.split(",") if x.strip()]
    _need(not any(name == "names" for name, _ in segments) or bool(names),
          f"config field 'memory.remat_names' = {m.remat_names!r}: memory.remat=names needs the tags to keep, "
          f"e.g. memory.remat_names=wq,wk,wv,attention")
    _need(0.0 <= m.fraction < 1.0, f"config field 'memory.fraction' = {m.fraction}: must be in [0, 1) (0 = JAX's default)")


def validate(cfg: Config, num_devices: int) -> dict[str, int]:
    """Check every cross-field constraint before any work; returns the resolved mesh sizes."""
    m, t, o = cfg.model, cfg.train, cfg.optimizer
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        value = getattr(m, name)
        _need(value > 0, f"config field 'model.{name}' = {value}: must be positive")
    _need(m.num_heads % m.num_kv_heads == 0,
          f"config field 'model.num_kv_heads' = {m.num_kv_heads}: must divide model.num_heads = {m.num_heads}")
    _need(m.head_dim > 0 or m.hidden_size % m.num_heads == 0,
          f"config field 'model.hidden_size' = {m.hidden_size}: must be divisible by model.num_heads = "
          f"{m.num_heads} (or set model.head_dim)")
    _need(m.resolved_head_dim % 2 == 0,
          f"config field 'model.head_dim' = {m.resolved_head_dim}: rotary embeddings need an even head_dim")
    _need(m.scan_unroll >= 1, f"config field 'model.scan_unroll' = {m.scan_unroll}: must be >= 1")
    _need(t.steps > 0, f"config field 'train.steps' = {t.steps}: must be positive")
    _need(t.seq_len > 0, f"config field 'train.seq_len' = {t.seq_len}: must be positive")
    _need(t.zero_stage in (0, 1, 3),
          f"config field 'train.zero_stage' = {t.zero_stage}: valid values are 0 (plain DP), 1 (optimizer "
          f"state sharded over data), 3 (parameters too, FSDP)")
    _need(t.dtype in ("float32", "bfloat16"),
          f"config field 'train.dtype' = {t.dtype!r}: valid values are 'float32', 'bfloat16'")
    _need(t.dtype == "float32" or cfg.precision.mode in ("auto", "bf16"),
          f"config field 'train.dtype' = {t.dtype!r} contradicts precision.mode = {cfg.precision.mode!r}; "
          f"set only precision.mode (train.dtype=bfloat16 is the older spelling of precision.mode=bf16)")
    _need(t.grad_accum >= 1, f"config field 'train.grad_accum' = {t.grad_accum}: must be >= 1")
    _need(t.global_batch % t.grad_accum == 0,
          f"config field 'train.global_batch' = {t.global_batch}: must be divisible by train.grad_accum = "
          f"{t.grad_accum}")
    _need(o.lr > 0, f"config field 'optimizer.lr' = {o.lr}: must be positive")
    _need(0.0 <= o.min_lr_ratio <= 1.0, f"config field 'optimizer.min_lr_ratio' = {o.min_lr_ratio}: must be in [0, 1]")
    _need(o.warmup_steps >= 0, f"config field 'optimizer.warmup_steps' = {o.warmup_steps}: must be >= 0")
    _need(o.grad_clip >= 0, f"config field 'optimizer.grad_clip' = {o.grad_clip}: must be >= 0 (0 disables)")
    _need(cfg.checkpoint.every >= 0, f"config field 'checkpoint.every' = {cfg.checkpoint.every}: must be >= 0")
    _need(cfg.checkpoint.keep >= 0, f"config field 'checkpoint.keep' = {cfg.checkpoint.keep}: must be >= 0 (0 = all)")
    c = cfg.checkpoint
    _need(c.keep_every >= 0 and (c.keep_every == 0 or c.every == 0 or c.keep_every % c.every == 0),
          f"config field 'checkpoint.keep_every' = {c.keep_every}: must be 0 (none) or a multiple of "
          f"checkpoint.every = {c.every}")
    _need(0 <= c.compression_level <= 22, f"config field 'checkpoint.compression_level' = {c.compression_level}: "
                                          f"must be a zstd level 1-22, or 0 (uncompressed)")
    _need(t.stop_at_step >= 0, f"config field 'train.stop_at_step' = {t.stop_at_step}: must be >= 0 (0 = off)")
    _need(cfg.logging.every >= 1, f"config field 'logging.every' = {cfg.logging.every}: must be >= 1")
    _need(cfg.bench.steps >= 1, f"config field 'bench.steps' = {cfg.bench.steps}: must be >= 1")
    _need(cfg.bench.warmup >= 0, f"config field 'bench.warmup' = {cfg.bench.warmup}: must be >= 0")
    validate_distributed(cfg.distributed)
    validate_precision(cfg.precision)
    validate_memory(cfg.memory, m.num_layers)

    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    validate_pipeline(cfg, sizes["pipe"], sizes)
    cp = sizes["context"]
    if cp > 1:
        chunks = 2 * cp if t.context_zigzag else cp
        layout = (f"2 x mesh.context = {chunks} (the zigzag layout cuts the sequence into 2 chunks per "
                  f"context rank; train.context_zigzag=false needs only mesh.context)" if t.context_zigzag
                  else f"mesh.context = {chunks}")
        _need(t.seq_len % chunks == 0,
              f"config field 'train.seq_len' = {t.seq_len}: must be divisible by {layout}; "
              f"e.g. train.seq_len={max(chunks, t.seq_len // chunks * chunks)}")
    tp = sizes["tensor"]
    _need(m.num_heads % tp == 0,
          f"config field 'model.num_heads' = {m.num_heads}: must be divisible by mesh.tensor = {tp}")
    _need(m.num_kv_heads % tp == 0 or tp % m.num_kv_heads == 0,
          f"config field 'model.num_kv_heads' = {m.num_kv_heads}: must be divisible by mesh.tensor = {tp}, or "
          f"divide it (then each KV head is replicated on {max(tp // m.num_kv_heads, 1)} tensor ranks)")
    _need(m.intermediate_size % tp == 0,
          f"config field 'model.intermediate_size' = {m.intermediate_size}: must be divisible by "
          f"mesh.tensor = {tp}")
    _need(m.vocab_size % tp == 0,
          f"config field 'model.vocab_size' = {m.vocab_size}: must be divisible by mesh.tensor = {tp} "
          f"(vocabulary-parallel embedding); round it up, e.g. to {math.ceil(m.vocab_size / tp) * tp}")
    validate_moe(cfg.moe, m, sizes)
    _need(cfg.moe.num_experts == 0 or cfg.memory.remat == "none",
          f"config field 'memory.remat' = {cfg.memory.remat!r}: remat policies apply to dense layer stacks; "
          f"a model with MoE layers (moe.num_experts = {cfg.moe.num_experts}) needs memory.remat=none")
    batch_ways = sizes["data"] * sizes["expert"]
    accum = cfg.pipeline.microbatches if sizes["pipe"] > 1 else t.grad_accum
    micro = t.global_batch // accum
    _need(micro % batch_ways == 0,
          f"config field 'train.global_batch' = {t.global_batch}: each of the {accum} microbatch(es) "
          f"has {micro} sequences, which must be divisible by mesh.data x mesh.expert = {batch_ways}")
    return sizes


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
    _need(sizes["pipe"] == 1, "MoE layers do not compose with mesh.pipe > 1 yet; set mesh.pipe=1")


def validate_pipeline(cfg: Config, pipe: int, sizes: dict[str, int] | None = None) -> None:
    """Pipeline checks; `sizes` (the resolved mesh) adds the ones that involve other axes."""
    pc, m, t = cfg.pipeline, cfg.model, cfg.train
    _need(pc.schedule in PIPELINE_SCHEDULES,
          f"config field 'pipeline.schedule' = {pc.schedule!r}: valid values are {', '.join(PIPELINE_SCHEDULES)}")
    if pipe == 1:
        _need(pc.schedule == "none",
              f"config field 'pipeline.schedule' = {pc.schedule!r} needs mesh.pipe > 1 (it is 1); set "
              f"mesh.pipe to the number of pipeline stages, or pipeline.schedule=none")
        return
    _need(pc.schedule != "none",
          f"config field 'mesh.pipe' = {pipe} needs a pipeline schedule: set pipeline.schedule to afab, 1f1b "
          f"or interleaved")
    _need(pc.microbatches >= 1, f"config field 'pipeline.microbatches' = {pc.microbatches}: must be >= 1")
    v = pc.virtual_stages if pc.schedule == "interleaved" else 1
    if pc.schedule == "interleaved":
        _need(pc.virtual_stages >= 2,
              f"config field 'pipeline.virtual_stages' = {pc.virtual_stages}: the interleaved schedule needs >= 2 "
              f"layer chunks per pipe rank (or use pipeline.schedule=1f1b)")
        _need(pc.microbatches % pipe == 0,
              f"config field 'pipeline.microbatches' = {pc.microbatches}: the interleaved schedule runs "
              f"microbatches in groups of mesh.pipe = {pipe}, so it must be a multiple of {pipe}")
    _need(m.num_layers % (pipe * v) == 0,
          f"config field 'model.num_layers' = {m.num_layers}: must be divisible into mesh.pipe x chunks = "
          f"{pipe} x {v} = {pipe * v} pipeline stages of equal size")
    _need(cfg.memory.remat == "none",
          f"config field 'memory.remat' = {cfg.memory.remat!r}: with mesh.pipe > 1 each stage's backward already "
          f"recomputes its forward (parallel/pipeline.py); set memory.remat=none")
    _need(cfg.precision.mode != "fp16",
          f"config field 'precision.mode' = 'fp16': pipeline parallelism (mesh.pipe = {pipe}) runs without loss "
          f"scaling; use precision.mode=fp32 or bf16")
    _need(t.grad_accum == 1,
          f"config field 'train.grad_accum' = {t.grad_accum}: with mesh.pipe > 1 the step's microbatches are "
          f"pipeline.microbatches; set train.grad_accum=1")
    _need(t.global_batch % pc.microbatches == 0,
          f"config field 'train.global_batch' = {t.global_batch}: must be divisible by pipeline.microbatches = "
          f"{pc.microbatches}")
    if sizes is None:
        return
    _need(sizes["context"] == 1,
          f"config field 'mesh.context' = {sizes['context']}: pipeline parallelism (mesh.pipe = {pipe}) does not "
          f"combine with context parallelism; use mesh.context=1")
    _need(m.num_kv_heads % sizes["tensor"] == 0,
          f"config field 'model.num_kv_heads' = {m.num_kv_heads}: with mesh.pipe > 1 it must be divisible by "
          f"mesh.tensor = {sizes['tensor']} (pipeline stages do not replicate KV heads)")
