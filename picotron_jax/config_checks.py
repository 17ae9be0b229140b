"""Validation of a loaded Config: `validate(cfg, num_devices)` checks every section against the others
and the device count before any work, with one UserError naming the field, its value and what would
be valid; plus the parsers of the compact string fields (precision overrides, remat segments).
"""

from __future__ import annotations

import math
from pathlib import Path

from picotron_jax.config import (
    CHECKPOINT_CODECS,
    CHECKPOINT_QUANTIZE,
    FAULT_PHASES,
    NAN_SITES,
    SPIKE_KINDS,
    CLUSTERS,
    MATMUL_PRECISIONS,
    PIPELINE_SCHEDULES,
    PRECISION_MODES,
    CheckpointConfig,
    Config,
    DistributedConfig,
    MemoryConfig,
    PrecisionConfig,
    resolve_mesh_shape,
)
from picotron_jax.config_checks_moe import validate_moe
from picotron_jax.errors import UserError, need as _need
from picotron_jax.units import parse_bytes


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


def validate_checkpoint_codecs(c: CheckpointConfig) -> None:
    """The codec and quantisation of checkpoints (checkpoint/codecs.py, checkpoint/quantize.py)."""
    _need(c.codec in CHECKPOINT_CODECS, f"config field 'checkpoint.codec' = {c.codec!r}: valid values are "
                                        f"{', '.join(repr(x) for x in CHECKPOINT_CODECS)}")
    _need(c.codec_time_budget >= 0, f"config field 'checkpoint.codec_time_budget' = {c.codec_time_budget}: must be "
                                    f">= 0 seconds (0 = no limit)")
    for name in ("quantize_optimizer", "quantize_params"):
        value = getattr(c, name)
        _need(value in CHECKPOINT_QUANTIZE, f"config field 'checkpoint.{name}' = {value!r}: valid values are "
                                            f"{', '.join(repr(x) for x in CHECKPOINT_QUANTIZE)}")
        _need(value == "none" or not c.require_lossless,
              f"config field 'checkpoint.{name}' = {value!r} stores the state lossy, but checkpoint.require_lossless "
              f"is set (a resume must be bitwise): use checkpoint.{name}=none, or drop checkpoint.require_lossless")


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
    _need(t.global_batch > 0, f"config field 'train.global_batch' = {t.global_batch}: must be positive")
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
    validate_checkpoint_codecs(c)
    _need(t.stop_at_step >= 0, f"config field 'train.stop_at_step' = {t.stop_at_step}: must be >= 0 (0 = off)")
    _need(cfg.logging.every >= 1, f"config field 'logging.every' = {cfg.logging.every}: must be >= 1")
    _need(cfg.bench.steps >= 1, f"config field 'bench.steps' = {cfg.bench.steps}: must be >= 1")
    _need(cfg.bench.warmup >= 0, f"config field 'bench.warmup' = {cfg.bench.warmup}: must be >= 0")
    validate_distributed(cfg.distributed)
    validate_precision(cfg.precision)
    validate_memory(cfg.memory, m.num_layers)

    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    validate_pipeline(cfg, sizes["pipe"])
    cp = sizes["context"]
    if cp > 1:
        chunks = 2 * cp if t.context_zigzag else cp
        layout = (f"2 x mesh.context = {chunks} (the zigzag layout cuts the sequence into 2 chunks per "
                  f"context rank; train.context_zigzag=false needs only mesh.context)" if t.context_zigzag
                  else f"mesh.context = {chunks}")
        _need(t.seq_len % chunks == 0,
              f"config field 'train.seq_len' = {t.seq_len}: must be divisible by {layout}; "
              f"e.g. train.seq_len={max(chunks, t.seq_len // chunks * chunks)}")
    dp = sizes["data"]
    _need(t.zero_stage == 0 or dp == 1 or m.hidden_size % dp == 0,
          f"config field 'train.zero_stage' = {t.zero_stage}: ZeRO splits every parameter's embed dimension "
          f"(model.hidden_size = {m.hidden_size}) over mesh.data = {dp}, which does not divide it; use a mesh.data "
          f"that divides {m.hidden_size}, or train.zero_stage=0")
    tp = sizes["tensor"]
    _need(m.num_heads % tp == 0,
          f"config field 'model.num_heads' = {m.num_heads}: must be divisible by mesh.tensor = {tp}")
    _need(m.num_kv_heads % tp == 0 or tp % m.num_kv_heads == 0,
          f"config field 'model.num_kv_heads' = {m.num_kv_heads}: must be divisible by mesh.tensor = {tp}, or "
          f"divide it (then the K/V projections are whole on every tensor rank)")
    _need(m.intermediate_size % tp == 0,
          f"config field 'model.intermediate_size' = {m.intermediate_size}: must be divisible by "
          f"mesh.tensor = {tp}")
    _need(m.vocab_size % tp == 0,
          f"config field 'model.vocab_size' = {m.vocab_size}: must be divisible by mesh.tensor = {tp} "
          f"(vocabulary-parallel embedding); round it up, e.g. to {math.ceil(m.vocab_size / tp) * tp}")
    validate_moe(cfg.moe, m, sizes)
    _need(cfg.moe.num_experts == 0 or len({name for name, _ in parse_remat(cfg.memory.remat, m.num_layers)}) == 1,
          f"config field 'memory.remat' = {cfg.memory.remat!r}: a model with MoE layers (moe.num_experts = "
          f"{cfg.moe.num_experts}) scans groups [MoE, dense x (every_n_layers - 1)], not layer ranges, so it takes "
          f"one policy for every layer (e.g. memory.remat=full), not per-layer segments")
    _need(cfg.moe.num_experts == 0 or cfg.precision.mode != "fp16",
          f"config field 'precision.mode' = 'fp16': MoE layers (moe.num_experts = {cfg.moe.num_experts}) run "
          f"without loss scaling; use precision.mode=fp32 or bf16")
    batch_ways = sizes["data"] * sizes["expert"]
    accum = cfg.pipeline.microbatches if sizes["pipe"] > 1 else t.grad_accum
    micro = t.global_batch // accum
    _need(micro % batch_ways == 0,
          f"config field 'train.global_batch' = {t.global_batch}: each of the {accum} microbatch(es) "
          f"has {micro} sequences, which must be divisible by mesh.data x mesh.expert = {batch_ways}")
    validate_eval(cfg, sizes)
    validate_generate(cfg)
    validate_faults(cfg, sizes)
    validate_monitor(cfg)
    validate_profile(cfg)
    validate_debug(cfg)
    validate_curriculum(cfg, sizes)
    validate_finite(cfg)
    return sizes


def validate_finite(cfg: Config) -> None:
    """Every float field of every section is a finite number (optimizer.lr=inf is refused by name)."""
    import dataclasses

    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            x = getattr(value, f.name)
            if isinstance(x, float) and not math.isfinite(x):
                raise UserError(f"config field '{section.name}.{f.name}' = {x}: must be a finite number")


def validate_profile(cfg: Config) -> None:
    p = cfg.profile
    _need(p.start_step == 0 or p.start_step >= 2,
          f"config field 'profile.start_step' = {p.start_step}: must be 0 (off) or >= 2 (step 1 compiles the step; "
          f"profile steady steps)")
    _need(p.steps >= 1, f"config field 'profile.steps' = {p.steps}: must be >= 1")
    _need(p.start_step == 0 or p.start_step + p.steps - 1 <= cfg.train.steps,
          f"config field 'profile.start_step' = {p.start_step}: the window (profile.steps = {p.steps}) must end by "
          f"train.steps = {cfg.train.steps}")
    if p.memory_budget:
        parse_bytes(p.memory_budget, "config field 'profile.memory_budget' =")


def validate_eval(cfg: Config, sizes: dict[str, int]) -> None:
    e = cfg.eval
    _need(e.tokens >= 0, f"config field 'eval.tokens' = {e.tokens}: must be >= 0 (0 -> eval.fraction)")
    _need(0.0 <= e.fraction < 1.0, f"config field 'eval.fraction' = {e.fraction}: must be in [0, 1)")
    _need(e.every >= 0, f"config field 'eval.every' = {e.every}: must be >= 0 (0 = at the end of a run only)")
    _need(e.batch >= 0, f"config field 'eval.batch' = {e.batch}: must be >= 0 (0 -> train.global_batch)")
    if not e.enabled:
        return
    ways = sizes["data"] * sizes["expert"] * (cfg.pipeline.microbatches if sizes["pipe"] > 1 else 1)
    batch = e.batch or cfg.train.global_batch
    what = "mesh.data x mesh.expert" + (" x pipeline.microbatches" if sizes["pipe"] > 1 else "")
    _need(batch % ways == 0, f"config field 'eval.batch' = {batch}: must be divisible by {what} = {ways}")


def validate_generate(cfg: Config) -> None:
    g = cfg.generate
    _need(g.max_new_tokens >= 1, f"config field 'generate.max_new_tokens' = {g.max_new_tokens}: must be >= 1")
    _need(math.isfinite(g.temperature) and g.temperature >= 0,
          f"config field 'generate.temperature' = {g.temperature}: must be >= 0 (0 = greedy)")
    _need(0 <= g.top_k <= cfg.model.vocab_size,
          f"config field 'generate.top_k' = {g.top_k}: must be between 1 and model.vocab_size = "
          f"{cfg.model.vocab_size}, or 0 (the whole vocabulary)")


def validate_faults(cfg: Config, sizes: dict[str, int]) -> None:
    f = cfg.faults
    for name in ("nan_step", "spike_step", "sleep_step", "sleep_steps", "hang_step", "flip_step", "process",
                 "moe_collapse_steps"):
        value = getattr(f, name)
        _need(value >= 0, f"config field 'faults.{name}' = {value}: must be >= 0 (0 = off)")
    for name, allowed in (("nan_site", NAN_SITES), ("spike_kind", SPIKE_KINDS), ("sleep_phase", FAULT_PHASES)):
        value = getattr(f, name)
        _need(value in allowed, f"config field 'faults.{name}' = {value!r}: valid values are {', '.join(allowed)}")
    for name in ("sleep_s", "slow_read_s"):
        value = getattr(f, name)
        _need(math.isfinite(value) and value >= 0, f"config field 'faults.{name}' = {value}: must be >= 0 seconds")
    _need(math.isfinite(f.spike_lr_scale) and f.spike_lr_scale > 0,
          f"config field 'faults.spike_lr_scale' = {f.spike_lr_scale}: must be > 0")
    _need(f.nan_step == 0 or 0 <= f.nan_layer < cfg.model.num_layers,
          f"config field 'faults.nan_layer' = {f.nan_layer}: must be a decoder layer, 0 to "
          f"{cfg.model.num_layers - 1}")
    _need(f.flip_step == 0 or 0 <= f.flip_replica < sizes["data"],
          f"config field 'faults.flip_replica' = {f.flip_replica}: must be an index along mesh.data, 0 to "
          f"{sizes['data'] - 1}")
    n = math.prod(sizes.values())
    _need(f.sleep_phase != "device" or 0 <= f.device < n,
          f"config field 'faults.device' = {f.device}: must be a device of this run, 0 to {n - 1}")
    _need(f.moe_collapse_step == 0 or (f.moe_collapse_step >= 2 and cfg.moe.enabled),
          f"config field 'faults.moe_collapse_step' = {f.moe_collapse_step}: must be 0 (off) or >= 2 (the routers "
          f"are zeroed after the step before it), in a model with MoE layers (moe.num_experts > 0)")


def validate_pipeline(cfg: Config, pipe: int) -> None:
    """Pipeline checks (`pipe`: the resolved mesh's pipe size)."""
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
    if cfg.moe.num_experts > 0:
        n = cfg.moe.every_n_layers
        _need((m.num_layers // (pipe * v)) % n == 0,
              f"config field 'moe.every_n_layers' = {n}: must divide the {m.num_layers // (pipe * v)} layers of each "
              f"of the {pipe * v} pipeline stages, so that every stage holds whole [MoE, dense x (n-1)] groups")
    _need(t.grad_accum == 1,
          f"config field 'train.grad_accum' = {t.grad_accum}: with mesh.pipe > 1 the step's microbatches are "
          f"pipeline.microbatches; set train.grad_accum=1")
    _need(t.global_batch % pc.microbatches == 0,
          f"config field 'train.global_batch' = {t.global_batch}: must be divisible by pipeline.microbatches = "
          f"{pc.microbatches}")


def validate_debug(cfg: Config) -> None:
    """Numbers of the `debug` section (the break_when expression is parsed by debug/expr.py at start)."""
    d = cfg.debug
    for name in ("break_timeout_s", "check_every", "recorder_size"):
        value = getattr(d, name)
        _need(value >= 0, f"config field 'debug.{name}' = {value}: must be >= 0")
    _need(d.break_timeout_s >= 1, f"config field 'debug.break_timeout_s' = {d.break_timeout_s}: must be >= 1 second")
def validate_curriculum(cfg: Config, sizes: dict[str, int]) -> None:
    """The `curriculum` section: sequence-length warm-up (data/curriculum.py)."""
    c, T = cfg.curriculum, cfg.train.seq_len
    from picotron_jax.config_sections import CURRICULUM_KINDS, CURRICULUM_PACINGS

    _need(c.kind in CURRICULUM_KINDS, f"config field 'curriculum.kind' = {c.kind!r}: valid values are "
                                      f"{', '.join(CURRICULUM_KINDS)}")
    if c.kind == "none":
        return
    if c.kind == "difficulty":
        from picotron_jax.data.curriculum_checks import validate_difficulty, validate_gated

        validate_difficulty(c)
        return validate_gated(cfg) if c.pacing == "gated" else None
    _need(c.mix_temperature == 0, f"config field 'curriculum.mix_temperature' = {c.mix_temperature}: mixing draws "
                                  "windows by difficulty, kind=difficulty only; set it to 0 for kind=seqlen")
    _need(c.pacing in CURRICULUM_PACINGS, f"config field 'curriculum.pacing' = {c.pacing!r}: valid values are "
                                          f"{', '.join(CURRICULUM_PACINGS)}")
    _need(c.seq_len_step >= 1 and T % c.seq_len_step == 0,
          f"config field 'curriculum.seq_len_step' = {c.seq_len_step}: must be >= 1 and divide train.seq_len = {T}")
    _need(sizes["context"] == 1 and sizes["pipe"] == 1,
          f"config field 'curriculum.kind' = {c.kind!r}: sequence-length warm-up runs without context or pipeline "
          f"parallelism (mesh.context = {sizes['context']}, mesh.pipe = {sizes['pipe']}); set both to 1")
    if c.pacing == "fixed_discrete":
        lengths, steps = c.discrete_lengths, c.discrete_steps
        _need(len(lengths) >= 1 and len(steps) == len(lengths) - 1,
              f"config field 'curriculum.discrete_steps' = {steps}: fixed_discrete needs one step per length but the "
              f"last (curriculum.discrete_lengths = {lengths}), e.g. discrete_lengths=[32,64,{T}] discrete_steps=[100,200]")
        _need(all(a < b for a, b in zip(steps, steps[1:])) and all(s > 0 for s in steps),
              f"config field 'curriculum.discrete_steps' = {steps}: must be positive and increasing")
        _need(lengths[-1] == T, f"config field 'curriculum.discrete_lengths' = {lengths}: the last length must be "
                                f"train.seq_len = {T}")
        starts = lengths
    elif c.pacing == "gated":
        from picotron_jax.data.curriculum_checks import validate_gated

        validate_gated(cfg)
        starts = [c.start_seq_len]
    else:
        _need(c.steps >= 1, f"config field 'curriculum.steps' = {c.steps}: must be >= 1 (steps to reach "
                            f"train.seq_len)")
        _need(c.pacing != "fixed_root" or c.root_degree >= 1,
              f"config field 'curriculum.root_degree' = {c.root_degree}: must be >= 1")
        starts = [c.start_seq_len]
    for L in starts:
        where = "curriculum.discrete_lengths" if c.pacing == "fixed_discrete" else "curriculum.start_seq_len"
        _need(0 < L <= T and L % c.seq_len_step == 0,
              f"config field '{where}' = {L}: must be a multiple of curriculum.seq_len_step = {c.seq_len_step} "
              f"in [{c.seq_len_step}, train.seq_len = {T}]")
        _need(not c.constant_tokens or T % L == 0,
              f"config field '{where}' = {L}: with curriculum.constant_tokens=true it must divide train.seq_len = "
              f"{T} (each row of the full batch is cut into seq_len / L rows); e.g. {T // 2 ** max(0, (T // L).bit_length() - 1)}")
def validate_monitor(cfg: Config) -> None:
    """The `monitor` section (observe/monitor.py); the webhook is only tried when an alert is sent."""
    from picotron_jax.config_sections import MONITOR_ACTIONS

    m = cfg.monitor
    allowed = {"on_nan": MONITOR_ACTIONS, "on_spike": MONITOR_ACTIONS,
               "on_throughput": ("log", "alert", "stop"), "on_memory": ("log", "alert", "stop"),
               "on_straggler": ("log", "alert", "stop")}
    for name, actions in allowed.items():
        value = getattr(m, name)
        _need(value in actions, f"config field 'monitor.{name}' = {value!r}: valid actions are {', '.join(actions)}")
    for name in ("layer_every", "check_every", "window"):
        value = getattr(m, name)
        _need(value >= 1, f"config field 'monitor.{name}' = {value}: must be >= 1 (steps)")
    for name in ("warmup", "max_rewinds", "webhook_retries"):
        value = getattr(m, name)
        _need(value >= 0, f"config field 'monitor.{name}' = {value}: must be >= 0")
    for name in ("spike_mads", "spike_min_rel", "grad_spike_min_rel", "disk_min_free_gb", "webhook_timeout_s",
                 "straggler_factor", "straggler_min_s"):
        value = getattr(m, name)
        _need(math.isfinite(value) and value >= 0, f"config field 'monitor.{name}' = {value}: must be >= 0")
    for name in ("throughput_drop", "memory_fraction", "host_memory_fraction"):
        value = getattr(m, name)
        _need(0 <= value <= 1, f"config field 'monitor.{name}' = {value}: must be a fraction from 0 (off) to 1")
    _need(0 <= m.prometheus_port < 65536,
          f"config field 'monitor.prometheus_port' = {m.prometheus_port}: must be a TCP port, or 0 (off)")
    _need(0 <= m.dashboard_port < 65536,
          f"config field 'monitor.dashboard_port' = {m.dashboard_port}: must be a TCP port, or 0 (off)")
    _need(not m.webhook_url or m.webhook_url.startswith(("http://", "https://")),
          f"config field 'monitor.webhook_url' = {m.webhook_url!r}: must be an http:// or https:// URL, or empty")
    _need(m.on_nan != "skip" or cfg.precision.mode != "fp16",
          "config field 'monitor.on_nan' = 'skip': fp16 runs already skip non-finite steps (the loss scaler); "
          "use rewind, alert or stop with precision.mode fp16")
