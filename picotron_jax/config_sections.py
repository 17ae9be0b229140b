"""The sections of the run configuration: one typed dataclass per YAML section, with defaults.

`config.py` assembles them into `Config` and does the loading; cross-field checks live in
config_checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    cache_dir: str = ""  # "" -> ~/.cache/picotron_jax/tokens (also the local-disk shard cache of remote stores)
    # token stores (picotron-jax data prepare; data/store.py, data/cache.py, data/mixture.py)
    cache_bytes: int = 10 << 30  # L2: bytes of a remote store's shards kept on local disk; 0 = none
    memory_bytes: int = 1 << 30  # L1: bytes of decoded shards kept in memory (LRU)
    prefetch_steps: int = 8  # most steps ahead whose shards are fetched in the background; 0 = no prefetch
    mixture: list[dict] = field(default_factory=list)  # [{source, weight[, schedule: [[step, weight], ...]]}, ...]


CHECKPOINT_CODECS = ("auto", "zstd", "lz4", "blosc-zstd", "blosc-lz4", "none")  # checkpoint/codecs.py
CHECKPOINT_QUANTIZE = ("none", "bf16", "int8")  # checkpoint/quantize.py


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" -> RUN_DIR/checkpoints
    every: int = 0  # steps between saves (and one at the end); 0 = never
    keep: int = 3  # newest checkpoints kept; 0 = all
    keep_every: int = 0  # steps: checkpoints at multiples of this are kept for good; 0 = none
    async_save: bool = True  # write in a background thread while training continues
    compression_level: int = 3  # level of the codec (zstd's 1-22; blosc gets the matching 1-9); 0 = uncompressed
    codec: str = "auto"  # auto (measured per array kind at the first save) | zstd | lz4 | blosc-zstd | blosc-lz4 | none
    codec_time_budget: float = 0.0  # auto: seconds encoding one save may take (estimated, one thread); 0 = no limit
    quantize_optimizer: str = "none"  # none | bf16 | int8 (block-wise absmax): Adam moments stored lossy, restored fp32
    quantize_params: str = "none"  # none | bf16 | int8: parameters stored lossy (never unless set here)
    require_lossless: bool = False  # refuse lossy storage and lossy checkpoints (bitwise-resume tests set it)


@dataclass
class LoggingConfig:
    every: int = 10  # steps between log lines / metrics rows
    run_dir: str = "runs/latest"
    progress: bool = True  # progress bar on a terminal (and in Jupyter)
    peak_flops: float = 0.0  # whole-run peak FLOP/s for MFU; 0 -> device table or measured CPU peak
    # extra loop callbacks (picotron_jax/callbacks.py): registered names or "package.module:Class"
    callbacks: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Validation loss on a held-out tail of the corpus (picotron_jax/train/evaluate.py); off when both
    `tokens` and `fraction` are 0. The held-out windows never appear in a training batch."""

    tokens: int = 0  # held-out tokens (whole windows of train.seq_len); 0 -> eval.fraction
    fraction: float = 0.0  # share of the corpus's windows held out, when eval.tokens = 0
    every: int = 0  # steps between evaluations (and one at the end of a run); 0 = at the end only
    batch: int = 0  # sequences per evaluation batch; 0 -> train.global_batch

    @property
    def enabled(self) -> bool:
        return self.tokens > 0 or self.fraction > 0


@dataclass
class GenerateConfig:
    """Sampling defaults of `picotron-jax generate` / `Trainer.generate` (picotron_jax/generate.py)."""

    prompt: str = ""  # printed with its continuation at the end of a training run; "" = no sample
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_k: int = 0  # sample from the k most likely tokens; 0 = all
    seed: int = 0


FAULT_PHASES = ("step", "data", "device")
NAN_SITES = ("forward", "gradient")
SPIKE_KINDS = ("noise", "lr")


@dataclass
class FaultsConfig:
    """Deliberate faults, to rehearse detectors and alerts (picotron_jax/faults.py, train/faults.py).

    Off by default; steps are 1-based (the k-th optimizer step). Every injection is logged."""

    nan_step: int = 0  # a NaN in decoder layer nan_layer at this step (inside the jitted step); 0 = off
    nan_layer: int = 0
    nan_site: str = "forward"  # forward (the layer's output) | gradient (the gradient reaching its output)
    spike_step: int = 0  # a loss spike at this step; 0 = off
    spike_kind: str = "noise"  # noise (the batch's tokens replaced by uniform noise) | lr (the update scaled)
    spike_lr_scale: float = 100.0  # spike_kind=lr: the update of that step is multiplied by this
    transient: bool = False  # in-step faults fire only the first time the loop runs their step (a machine
    #                          fault that a replay does not reproduce); false: whenever it runs (a bad batch)
    process: int = 0  # the process the host-side faults below act on
    sleep_step: int = 0  # sleep sleep_s seconds from this step on, for sleep_steps steps; 0 = off
    sleep_steps: int = 1  # 0 = until the end
    sleep_s: float = 0.0
    sleep_phase: str = "step"  # step (before the step is dispatched) | data (in the data loader) | device (one
    #                            device's step starts sleep_s late: its batch shard arrives late; a straggler)
    device: int = 0  # sleep_phase=device: the device (index in the run's device list) that is late
    moe_collapse_step: int = 0  # from this step on (>= 2) the MoE routers' weights are zero before every step, so
    #                             every token picks experts 0..top_k-1 (a collapsed router); 0 = off
    moe_collapse_steps: int = 0  # steps it lasts; 0 = until the end
    hang_step: int = 0  # the process stops before this step and never continues (a hang); 0 = off
    flip_step: int = 0  # after this step, one element of one array changes by one ulp on one device; 0 = off
    flip_array: str = ""  # parameter path, e.g. layers.wq; "" = the first parameter
    flip_replica: int = 1  # index along mesh.data of the device whose copy changes
    slow_read_s: float = 0.0  # seconds added to every batch read (a slow data source)

    @property
    def in_step(self) -> bool:
        return self.nan_step > 0 or self.spike_step > 0


@dataclass
class ProfileConfig:
    """A profiling window in a training run (picotron_jax/profile): jax.profiler traces steps start_step ..
    start_step + steps - 1 into `dir`, then the window is analysed (profile.md, profile.json)."""

    start_step: int = 0  # first traced step (>= 2: step 1 compiles); 0 = off
    steps: int = 3
    dir: str = ""  # "" -> RUN_DIR/profile
    analyze: bool = True  # analyse the window when it ends (bottleneck findings); false = trace only
    memory_budget: str = ""  # bytes per device the memory rules fit ("512MiB"); "" = the device's memory


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
class DebugConfig:
    """The distributed debugger (picotron_jax/debug/): breakpoints, replica checks, hang dumps, post-mortem."""

    break_when: str = ""  # e.g. "loss > 5 and step > 100": inspect after the steps whose metrics satisfy it
    break_timeout_s: int = 3600  # several processes: how long the others wait while process 0 inspects
    check_every: int = 0  # every N steps: compare parameter/optimizer fingerprints across replicas; 0 = off
    check_start: bool = True  # several processes: refuse to start unless config, code and program agree
    recorder_size: int = 256  # entries in each process's flight recorder (dumped to RUN_DIR/debug/ on a hang)
    save_on_crash: bool = False  # on an unexpected exception, also checkpoint the last good state
    nan_origin: bool = False  # trace the first non-finite step to its op (replayed from the checkpoint before it)


CURRICULUM_KINDS = ("none", "seqlen", "difficulty")
CURRICULUM_METRICS = ("compression", "rarity", "reference", "field", "length")
CURRICULUM_PACINGS = ("fixed_linear", "fixed_root", "fixed_discrete", "gated")


@dataclass
class CurriculumConfig:
    """Sequence-length warm-up (data/curriculum.py): short sequences first, DeepSpeed's pacing functions."""

    kind: str = "none"  # none | seqlen (short -> long sequences) | difficulty (easy -> hard windows)
    pacing: str = "fixed_linear"  # fixed_linear | fixed_root | fixed_discrete (DeepSpeed's schedule_type) | gated
    start_seq_len: int = 0  # the first stage's length (DeepSpeed's min_difficulty); required for kind=seqlen
    steps: int = 0  # steps to reach train.seq_len (DeepSpeed's total_curriculum_step); fixed_linear/fixed_root
    seq_len_step: int = 8  # lengths are multiples of this (DeepSpeed's difficulty_step): fewer buckets, compiles
    root_degree: int = 2  # fixed_root: the pacing is (step / steps) ** (1 / root_degree)
    discrete_lengths: list[int] = field(default_factory=list)  # fixed_discrete: the lengths, e.g. [32, 64, 128]
    discrete_steps: list[int] = field(default_factory=list)  # fixed_discrete: last step of each but the last length
    constant_tokens: bool = True  # rebuild the batch as global_batch * seq_len / L rows of L; false = truncate rows
    metric: str = "compression"  # kind=difficulty: compression | rarity | reference | field | length (data/curriculum_difficulty.py)
    reference_checkpoint: str = ""  # metric=reference: a checkpoints folder (newest step) or one step folder
    score_field: str = ""  # metric=field: the .jsonl/.parquet field holding each document's difficulty
    start_percentile: int = 0  # kind=difficulty: the first steps draw from the easiest this-many percent (1..100)
    mix_temperature: float = 0.0  # kind=difficulty: 0 = draw from the pool only; > 0 = harder windows too, decaying
    # pacing=gated (data/curriculum_gate.py): one stage (bucket) more at a scheduled eval whose loss is below
    # gate_loss, or whose stage's last gate_patience evals improved on its best before by < gate_min_delta
    gate_loss: float = 0.0  # advance once an eval loss is <= this; 0 = off (plateaus only)
    gate_patience: int = 2  # evals of a stage that must improve on its best before them ...
    gate_min_delta: float = 0.01  # ... by at least this fraction of it, or the stage has plateaued
    gate_delay: int = 4  # a stage decided at the eval of step e begins at step e + gate_delay (>= 4: read-ahead)
    gate_stages: int = 4  # kind=difficulty: percentile stages, start_percentile to 100 evenly (seqlen: the buckets)


META_TASKS = ("sine", "corpus")


@dataclass
class MetaConfig:
    """Meta-learning (picotron_jax/meta, `picotron-jax meta`): tasks over mesh.data, the model over mesh.tensor
    (and mesh.data with train.zero_stage=3); the outer optimizer is Adam."""

    task: str = "sine"  # sine: sinusoid regression with a small MLP (Finn et al. 2017) | corpus: one document of
    # data.source per task, next-token prediction with the `model` section's Llama (meta/corpus_tasks.py)
    algorithm: str = "maml"  # maml (second order) | fomaml | reptile | metasgd (learned per-parameter inner LRs)
    inner_steps: int = 1  # SGD steps on a task's support set
    inner_lr: float = 0.01  # their learning rate (metasgd: the learned rates' initial value)
    remat: bool = True  # rematerialise each inner step: memory does not grow with the inner steps' activations
    steps: int = 1000  # outer (meta) steps
    tasks_per_step: int = 8  # tasks in one meta-batch, split over mesh.data
    k_support: int = 10  # points (corpus: sequences of train.seq_len tokens) to adapt on
    k_query: int = 10  # held-out points (sequences) of the same task scoring the adapted model
    outer_lr: float = 1.0e-3  # Adam
    hidden: int = 40  # the sine MLP's hidden width
    seed: int = 0
    eval_tasks: int = 100  # held-out tasks of the adaptation curves (corpus: documents training never draws)
    eval_steps: int = 10  # the curves: query loss after 0 .. eval_steps inner steps
    log_every: int = 100
MONITOR_ACTIONS = ("log", "alert", "skip", "rewind", "rerun", "stop")


@dataclass
class MonitorConfig:
    """Real-time monitoring (picotron_jax/observe/monitor.py): in-step statistics, anomaly detectors with
    actions, alerts (alerts.jsonl, console banner, webhook) and sinks (TensorBoard, Prometheus)."""

    enabled: bool = True  # detectors and alerts; false = only the plain non-finite-loss stop
    layer_stats: bool = True  # per-layer gradient / parameter / update norms computed inside the jitted step
    layer_every: int = 10  # ... on every this many steps (and on any step whose gradient is non-finite)
    layer_activations: bool = True  # ... and, on those steps, each layer's output RMS and attention-logit max
    check_every: int = 1  # the detectors read the step's loss and grad norm every this many steps (a host sync)
    window: int = 50  # steps of the rolling median / MAD of loss and grad norm
    warmup: int = 20  # steps at the start of each run() whose loss and grad norm are not judged
    spike_mads: float = 8.0  # a spike: value > median + spike_mads x 1.4826 MAD of the window ...
    spike_min_rel: float = 0.25  # ... and > (1 + spike_min_rel) x median (ignores noise on a flat curve)
    grad_spike_min_rel: float = 3.0  # the same for the grad norm, which is heavy-tailed (4 x median by default)
    throughput_drop: float = 0.5  # logged tokens/s below this fraction of the run's median: an anomaly; 0 = off
    memory_fraction: float = 0.95  # device memory in use above this fraction of its limit (GPU/TPU); 0 = off
    host_memory_fraction: float = 0.97  # host RAM in use above this fraction; 0 = off
    disk_min_free_gb: float = 1.0  # before a checkpoint save: less free space than this in the run dir; 0 = off
    on_nan: str = "rewind"  # log | alert | skip (inside the step) | rewind | rerun | stop; rewind without a checkpoint = stop
    on_spike: str = "alert"  # log | alert | skip (inside the step, windows in the train state) | rewind | rerun | stop
    on_throughput: str = "alert"  # log | alert | stop
    on_memory: str = "alert"  # log | alert | stop (device memory, host memory, disk space)
    on_straggler: str = "alert"  # log | alert | stop (multi-process: a process far slower than the others)
    straggler_factor: float = 3.0  # a process's data wait + callback time above this x the others' median; 0 = off
    straggler_min_s: float = 0.05  # ... and above this many seconds per logged interval (ignores noise)
    max_rewinds: int = 3  # rewinds allowed in one run; one more anomaly asking for a rewind stops the run
    tensorboard: bool = True  # RUN_DIR/tensorboard/ event files (tensorboardX): scalars, layer histograms, config
    plots: bool = False  # RUN_DIR/plots/*.png at the end of a run (observe/plots.py; also `picotron-jax plot RUN_DIR`)
    prometheus_port: int = 0  # serve the latest row as Prometheus text at http://127.0.0.1:PORT/metrics; 0 = off
    dashboard_port: int = 0  # serve the live dashboard (observe/dashboard.py) at http://127.0.0.1:PORT/; 0 = off
    webhook_url: str = ""  # POST every alert as JSON to this URL (a background thread; never blocks a step)
    webhook_timeout_s: float = 5.0
    webhook_retries: int = 2
