"""Llama decoder (Touvron et al. 2023) in Flax NNX with stacked, scanned layers.

Tensors are named with their shape letters (nanodo convention): B batch, T time, D model width,
F MLP width, H query heads, G KV heads, R = H/G query heads per KV head, K head dim, V vocab,
L layers. Every parameter carries `logical_axes` metadata that `parallel/sharding.py` maps to
mesh axes. Weights are stored input-first ([in, out], e.g. wq [L, D, H, K]) and applied with
`project`, whose hand-written VJP keeps XLA:CPU's weight-gradient dots fast (models/linear.py).

Layers are stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile time
does not grow with depth. Initialisation uses only the seed (one key per parameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from picotron_jax.compat import vary, varying_axes
from picotron_jax.config import ModelConfig, MoEConfig
from picotron_jax.models import moe as moe_math
from picotron_jax.models.attention import apply_rotary, rotary_tables
from picotron_jax.models.linear import project
from picotron_jax.models.moe_layers import DENSE_MLP_PARAMS, init_moe_params, moe_plan, run_mixed_stack
from picotron_jax.models.ops import LOCAL_OPS, LocalOps, ParallelOps  # noqa: F401 (re-exported)


# name -> (logical axes, shape from (L, D, F, H, G, K, V)); "norm" params start at one.
LAYER_PARAMS = {
    "attn_norm": (("layers", "embed"), lambda L, D, F, H, G, K: (L, D)),
    "wq": (("layers", "embed", "heads", "head_dim"), lambda L, D, F, H, G, K: (L, D, H, K)),
    "wk": (("layers", "embed", "kv_heads", "head_dim"), lambda L, D, F, H, G, K: (L, D, G, K)),
    "wv": (("layers", "embed", "kv_heads", "head_dim"), lambda L, D, F, H, G, K: (L, D, G, K)),
    "wo": (("layers", "heads", "head_dim", "embed"), lambda L, D, F, H, G, K: (L, H, K, D)),
    "mlp_norm": (("layers", "embed"), lambda L, D, F, H, G, K: (L, D)),
    "w_gate": (("layers", "embed", "mlp"), lambda L, D, F, H, G, K: (L, D, F)),
    "w_up": (("layers", "embed", "mlp"), lambda L, D, F, H, G, K: (L, D, F)),
    "w_down": (("layers", "mlp", "embed"), lambda L, D, F, H, G, K: (L, F, D)),
}
OUTPUT_PROJECTIONS = ("wo", "w_down")  # scaled by 1/sqrt(2L) at init (GPT-2, Radford et al. 2019)
LAYER_INDEX = "_layer"  # a layer-index leaf scanned with the stacked params when a layer tap is given


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float, dtype=None) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019), returned in x's dtype. Every operation, the scale included, is in
    `dtype`: fp32 unless the precision policy overrides this norm (train/precision.py)."""
    cd = jnp.dtype(jnp.float32 if dtype is None else dtype)
    xc = x_BTD.astype(cd)
    xc = xc * jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + jnp.asarray(eps, cd))
    return (xc * scale_D.astype(cd)).astype(x_BTD.dtype)


def decoder_block(p: dict, x_BTD: jax.Array, cos_TK, sin_TK, cfg: ModelConfig, ops: ParallelOps,
                  attention_dtype=None, norm_dtypes: Mapping[str, jnp.dtype] | None = None) -> jax.Array:
    """One pre-norm Llama block: x + Attn(norm(x)), then x + SwiGLU(norm(x)). `p` holds one layer.

    Module outputs carry `checkpoint_name` tags (the weight's name, and "attention") for the
    named remat policies of train/remat.py; `attention_dtype` is the attention core's compute dtype
    when it differs from the stream's, `norm_dtypes` ("attn_norm"/"mlp_norm" -> dtype) those of overridden
    norms (train/precision.py)."""
    x_BTD = attention_residual(p, x_BTD, cos_TK, sin_TK, cfg, ops, attention_dtype, norm_dtypes)
    return dense_mlp_residual(p, x_BTD, cfg, ops, norm_dtypes)


def attention_residual(p: dict, x_BTD: jax.Array, cos_TK, sin_TK, cfg: ModelConfig, ops: ParallelOps,
                       attention_dtype=None, norm_dtypes: Mapping[str, jnp.dtype] | None = None) -> jax.Array:
    """x + Attn(norm(x))."""
    return attention_residual_qk(p, x_BTD, cos_TK, sin_TK, cfg, ops, attention_dtype, norm_dtypes)[0]


def attention_residual_qk(p: dict, x_BTD: jax.Array, cos_TK, sin_TK, cfg: ModelConfig, ops: ParallelOps,
                          attention_dtype=None, norm_dtypes: Mapping[str, jnp.dtype] | None = None):
    """(x + Attn(norm(x)), the rotated queries, the keys): the monitor's layer probe reads q and k."""
    q_BTHK, k_BTGK, v_BTGK = attention_inputs(p, x_BTD, cos_TK, sin_TK, cfg, ops, attention_dtype, norm_dtypes)
    with jax.named_scope("attention"):
        o_BTHK = checkpoint_name(ops.attention(q_BTHK, k_BTGK, v_BTGK).astype(x_BTD.dtype), "attention")
    return attention_output(p, x_BTD, o_BTHK, ops), q_BTHK, k_BTGK


def attention_inputs(p: dict, x_BTD: jax.Array, cos_TK, sin_TK, cfg: ModelConfig, ops: ParallelOps,
                     attention_dtype=None, norm_dtypes: Mapping[str, jnp.dtype] | None = None,
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries [B, T, H, K], keys and values [B, T, G, K] of norm(x) (also the KV cache's input)."""
    with jax.named_scope("attn_norm"):
        norm_dtype = (norm_dtypes or {}).get("attn_norm")
        h_BTD = checkpoint_name(rms_norm(x_BTD, p["attn_norm"], cfg.rms_norm_eps, norm_dtype), "attn_norm")
    with jax.named_scope("qkv"):
        q_BTHK = checkpoint_name(project("btd,dhk->bthk", h_BTD, p["wq"]), "wq")
        k_BTGK = checkpoint_name(project("btd,dgk->btgk", h_BTD, p["wk"]), "wk")
        v_BTGK = checkpoint_name(project("btd,dgk->btgk", h_BTD, p["wv"]), "wv")
        q_BTHK = ops.constrain(apply_rotary(q_BTHK, cos_TK, sin_TK), ("batch", "seq", "heads", "head_dim"))
        k_BTGK = ops.constrain(apply_rotary(k_BTGK, cos_TK, sin_TK), ("batch", "seq", "kv_heads", "head_dim"))
        v_BTGK = ops.constrain(v_BTGK, ("batch", "seq", "kv_heads", "head_dim"))
    if attention_dtype is not None:
        q_BTHK, k_BTGK, v_BTGK = (t.astype(attention_dtype) for t in (q_BTHK, k_BTGK, v_BTGK))
    return q_BTHK, k_BTGK, v_BTGK


def attention_output(p: dict, x_BTD: jax.Array, o_BTHK: jax.Array, ops: ParallelOps) -> jax.Array:
    """x + the output projection of the attention's output."""
    with jax.named_scope("attn_out"):
        x_BTD = x_BTD + checkpoint_name(ops.sum_partials(project("bthk,hkd->btd", o_BTHK, p["wo"])), "wo")
        return ops.constrain(x_BTD, ("batch", "seq", "embed"))


def dense_mlp_residual(p: dict, x_BTD: jax.Array, cfg: ModelConfig, ops: ParallelOps,
                       norm_dtypes: Mapping[str, jnp.dtype] | None = None) -> jax.Array:
    """x + SwiGLU(norm(x))."""
    with jax.named_scope("mlp_norm"):
        norm_dtype = (norm_dtypes or {}).get("mlp_norm")
        h_BTD = checkpoint_name(rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps, norm_dtype), "mlp_norm")
    with jax.named_scope("mlp"):
        gate_BTF = checkpoint_name(project("btd,df->btf", h_BTD, p["w_gate"]), "w_gate")
        up_BTF = checkpoint_name(project("btd,df->btf", h_BTD, p["w_up"]), "w_up")
        act_BTF = ops.constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
        x_BTD = x_BTD + checkpoint_name(ops.sum_partials(project("btf,fd->btd", act_BTF, p["w_down"])), "w_down")
        return ops.constrain(x_BTD, ("batch", "seq", "embed"))


def scan_layers(block: Callable, x_BTD: jax.Array, stacked: dict, unroll: int) -> jax.Array:
    """x -> block(x, layer l's params) for l = 0..L-1, as one scan over the stacked `layers` axis."""
    x_BTD, _ = jax.lax.scan(lambda x, p: (block(x, p), None), x_BTD, stacked, unroll=unroll)
    return x_BTD


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, moe: MoEConfig | None = None):
        self.cfg = cfg
        self.moe_cfg = moe if moe is not None and moe.enabled else None
        self.moe_plan = plan = moe_plan(cfg, moe)  # None: a dense model (every layer a SwiGLU MLP)
        L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        H, G, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.vocab_size

        self.embed = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (V, D), param_dtype), logical_axes=("vocab", "embed")
        )
        layers = {}
        for name, (axes, shape_fn) in LAYER_PARAMS.items():
            shape = shape_fn(L, D, F, H, G, K)
            if plan is not None and name in DENSE_MLP_PARAMS:  # MoE model: dense MLPs of dense layers only
                if plan.num_dense == 0:
                    continue
                shape = (plan.num_dense, *shape[1:])
            if name.endswith("norm"):
                value = jnp.ones(shape, param_dtype)
            else:
                std = cfg.init_std / (2 * L) ** 0.5 if name in OUTPUT_PROJECTIONS else cfg.init_std
                value = std * jax.random.normal(rngs.params(), shape, param_dtype)
            layers[name] = nnx.Param(value, logical_axes=axes)
        self.layers = nnx.Dict(layers)
        if plan is not None:
            self.moe = nnx.Dict(init_moe_params(cfg, self.moe_cfg, plan, rngs, param_dtype))
        self.final_norm = nnx.Param(jnp.ones((D,), param_dtype), logical_axes=("embed",))
        if not cfg.tie_embeddings:  # [D, V], input-first like every projection
            self.lm_head = nnx.Param(
                cfg.init_std * jax.random.normal(rngs.params(), (D, V), param_dtype), logical_axes=("embed", "vocab")
            )

    def head_weight(self) -> jax.Array:
        """The LM head: [D, V], or the [V, D] embedding table when tied (see `head_is_vocab_first`)."""
        return getattr(self, head_param(self.cfg))[...]

    @property
    def head_is_vocab_first(self) -> bool:
        return self.cfg.tie_embeddings

    def hidden_states(self, tokens_BT: jax.Array, ops: ParallelOps = LOCAL_OPS,
                      compute_dtype=jnp.float32, positions_T: jax.Array | None = None,
                      module_dtypes: Mapping[str, jnp.dtype] | None = None,
                      layer_stack: Callable | None = None) -> jax.Array:
        """tokens [B, T] -> final-normed hidden states [B, T, D] (the LM head is applied by the loss).

        `positions_T`: the position of each column (default arange(T)); context parallelism passes
        its zigzag order (parallel/context.py), in which the tokens are then laid out.
        `module_dtypes`: compute dtypes of modules that differ from their default ("embed",
        "layers.wq", "layers.attention", ...; train/precision.py). `layer_stack(block, x, stacked,
        unroll)`: how the layers are scanned (remat policies, train/remat.py); default a plain scan."""
        return self.hidden_states_and_moe_stats(tokens_BT, ops, compute_dtype, positions_T, module_dtypes,
                                                layer_stack)[0]

    def hidden_states_and_moe_stats(self, tokens_BT: jax.Array, ops: ParallelOps = LOCAL_OPS,
                                    compute_dtype=jnp.float32, positions_T: jax.Array | None = None,
                                    module_dtypes: Mapping[str, jnp.dtype] | None = None,
                                    layer_stack: Callable | None = None, layer_tap: Callable | None = None):
        """As `hidden_states`, plus the MoE layers' stats (dict of [L_moe, ...], models/moe.py; None if dense).
        The pieces (`embed_tokens`, `run_layers`, `final_norm`) are the ones the pipeline's stage program
        calls (parallel/pipeline.py). `layer_tap(x_BTD, layer)`: see `run_layers`."""
        return self.hidden_states_and_stats(tokens_BT, ops, compute_dtype, positions_T, module_dtypes, layer_stack,
                                            layer_tap)[:2]

    def hidden_states_and_stats(self, tokens_BT: jax.Array, ops: ParallelOps = LOCAL_OPS,
                                compute_dtype=jnp.float32, positions_T: jax.Array | None = None,
                                module_dtypes: Mapping[str, jnp.dtype] | None = None,
                                layer_stack: Callable | None = None, layer_tap: Callable | None = None,
                                probe_on: jax.Array | None = None):
        """As `hidden_states_and_moe_stats`, plus the layer probe's statistics (`run_layers`; None without
        `probe_on`)."""
        cfg = self.cfg
        x_BTD = embed_tokens(self.embed[...], tokens_BT, ops, compute_dtype, module_dtypes)
        positions_T = jnp.arange(tokens_BT.shape[1]) if positions_T is None else positions_T
        cos_TK, sin_TK = rotary_tables(positions_T, cfg.resolved_head_dim, cfg.rope_theta)
        stacked = cast_layers({name: v[...] for name, v in self.layers.items()}, compute_dtype, module_dtypes)
        moe = None
        if self.moe_plan is not None:
            moe = MoEStack(self.moe_cfg, self.moe_plan, cast_moe({k: v[...] for k, v in self.moe.items()}, compute_dtype))
        probe = None if probe_on is None else LayerProbe(probe_on, positions_T)
        x_BTD, stats, probed = run_layers(stacked, x_BTD, cos_TK, sin_TK, cfg, ops, module_dtypes, layer_stack,
                                          layer_tap, moe, probe=probe)
        return final_norm(x_BTD, self.final_norm[...], cfg, module_dtypes), stats, probed

    def __call__(self, tokens_BT: jax.Array, ops: ParallelOps = LOCAL_OPS) -> jax.Array:
        """tokens [B, T] -> logits [B, T, V] (full logits: for inference and inspection)."""
        h_BTD = self.hidden_states(tokens_BT, ops)
        spec = "btd,vd->btv" if self.head_is_vocab_first else "btd,dv->btv"
        return jnp.einsum(spec, h_BTD, self.head_weight(), preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------ the pieces
# The model as functions of plain arrays: the plain step (through `Llama.hidden_states_and_moe_stats`
# and `head_loss`) and the pipeline's stage program (parallel/pipeline.py) call these same functions.

NORMS = ("layers.attn_norm", "layers.mlp_norm", "final_norm")  # fp32 unless overridden (train/precision.py)


def module_dtype(module: str, compute_dtype, module_dtypes: Mapping[str, jnp.dtype] | None = None) -> jnp.dtype:
    """A module's compute dtype: its override, else fp32 for norms and `compute_dtype` for the rest."""
    return jnp.dtype((module_dtypes or {}).get(module, jnp.float32 if module in NORMS else compute_dtype))


def head_param(cfg: ModelConfig) -> str:
    """The parameter the LM head reads: the [V, D] embedding table when tied, else the [D, V] `lm_head`."""
    return "embed" if cfg.tie_embeddings else "lm_head"


def embed_tokens(table_VD: jax.Array, tokens_BT: jax.Array, ops: ParallelOps, compute_dtype,
                 module_dtypes: Mapping[str, jnp.dtype] | None = None) -> jax.Array:
    """tokens [B, T] -> embeddings [B, T, D] in the compute dtype."""
    with jax.named_scope("embed"):  # named scopes: the profiler's modules (picotron_jax/profile)
        x_BTD = ops.embed(table_VD.astype(module_dtype("embed", compute_dtype, module_dtypes)), tokens_BT)
        return ops.constrain(x_BTD.astype(compute_dtype), ("batch", "seq", "embed"))


def cast_layers(layers: Mapping[str, jax.Array], compute_dtype,
                module_dtypes: Mapping[str, jnp.dtype] | None = None) -> dict:
    """Stacked layer params [L', ...] in their modules' compute dtypes."""
    return {name: a.astype(module_dtype(f"layers.{name}", compute_dtype, module_dtypes)) for name, a in layers.items()}


def cast_moe(moe: Mapping[str, jax.Array], compute_dtype) -> dict:
    """MoE layer params [L_moe, ...] for the stack: the router (and its bias) in fp32, the experts in the
    compute dtype."""
    return {k: v if k.startswith("router") else v.astype(compute_dtype) for k, v in moe.items()}


@dataclass(frozen=True)
class MoEStack:
    """What `run_layers` needs for a mixed dense/MoE stack (models/moe_layers.py)."""

    cfg: MoEConfig
    plan: Any  # moe_layers.MoEPlan
    params: dict  # [L_moe, ...]


@dataclass(frozen=True)
class LayerProbe:
    """The monitor's per-layer activation statistics (train/monitor_stats.py), computed inside the layer scan
    under a `lax.cond` on `on` (a traced bool: steps where it is false compute nothing): each decoder layer's
    output mean square (`act_ms`) and its attention-logit max (`attn_logit_max`, `ParallelOps.attention_logit_max`).
    `positions_T`: the columns' positions (context parallelism's zigzag layout; None = arange)."""

    on: jax.Array
    positions_T: jax.Array | None = None


PROBE_FIELDS = ("act_ms", "attn_logit_max")
# how each field combines over microbatches, data groups and token ranks: mean squares add (the reader
# divides by the number of parts, train/monitor_stats.probe_fields), maxima take the max
PROBE_COMBINE = {"act_ms": "sum", "attn_logit_max": "max"}
PROBE_INDEX = "_probe_layer"  # the layer's index within the stack run, scanned with the params under a probe


def _vary_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """x typed as varying over the mesh axes `ref` varies over (inside shard_map; the identity outside)."""
    return vary(x, tuple(sorted(varying_axes(ref))))


def _probe_init(probe: LayerProbe, x_BTD: jax.Array, num_layers: int) -> dict:
    return {k: _vary_like(jnp.zeros((num_layers,), jnp.float32), x_BTD) for k in PROBE_FIELDS}


def _probe_record(probe: LayerProbe, acc: dict, layer: jax.Array, x_BTD, q_BTHK, k_BTGK, ops: ParallelOps) -> dict:
    """acc with this layer's entries set (computed only when `probe.on`)."""
    ref = acc[PROBE_FIELDS[0]]

    def compute():
        x = jax.lax.stop_gradient(x_BTD).astype(jnp.float32)
        q, k = jax.lax.stop_gradient(q_BTHK), jax.lax.stop_gradient(k_BTGK)
        vals = {"act_ms": jnp.mean(jnp.square(x)), "attn_logit_max": ops.attention_logit_max(q, k, probe.positions_T)}
        return {n: _vary_like(v, ref) for n, v in vals.items()}

    skip = lambda: {n: _vary_like(jnp.zeros((), jnp.float32), ref) for n in PROBE_FIELDS}  # noqa: E731
    vals = jax.lax.cond(probe.on, compute, skip)
    return {n: acc[n].at[layer].set(vals[n]) for n in PROBE_FIELDS}


def run_layers(stacked: dict, x_BTD: jax.Array, cos_TK, sin_TK, cfg: ModelConfig, ops: ParallelOps,
               module_dtypes: Mapping[str, jnp.dtype] | None = None, layer_stack: Callable | None = None,
               layer_tap: Callable | None = None, moe: MoEStack | None = None,
               first_layer: int | jax.Array = 0, probe: LayerProbe | None = None,
               ) -> tuple[jax.Array, dict | None, dict | None]:
    """Run the decoder layers stacked in `stacked` ([L', ...], already cast: `cast_layers`) in order:
    x -> (x, MoE stats or None, probe stats or None). `layer_stack(block, x, stacked, unroll)` scans a dense
    stack (remat policies, train/remat.py); MoE models scan their mixed stack themselves (models/moe_layers.py).
    `layer_tap(x_BTD, layer)` sees (and may change) every layer's output, `layer` its traced index
    counted from `first_layer` (the fault injector's hook, train/faults.py); without it the program is
    unchanged. `probe`: the per-layer statistics of `LayerProbe` ({field: f32[L']}), carried through the
    scan beside x (the stacks see one opaque carry); without it the program is unchanged."""
    attention_dtype = (module_dtypes or {}).get("layers.attention")
    norm_dtypes = {m: d for m in ("attn_norm", "mlp_norm") if (d := (module_dtypes or {}).get(f"layers.{m}"))}
    tap = (lambda x, p: x) if layer_tap is None else (lambda x, p: layer_tap(x, p[LAYER_INDEX]))  # noqa: E731
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    if layer_tap is not None:  # scanned with the layers, so each layer knows its index
        stacked = {**stacked, LAYER_INDEX: first_layer + jnp.arange(num_layers)}
    carry = x_BTD
    if probe is not None:
        stacked = {**stacked, PROBE_INDEX: jnp.arange(num_layers)}
        carry = (x_BTD, _probe_init(probe, x_BTD, num_layers))

    def attention(p, c):  # -> (x after attention, probe acc, q, k)
        x, acc = c if probe is not None else (c, None)
        x, q, k = attention_residual_qk(p, x, cos_TK, sin_TK, cfg, ops, attention_dtype, norm_dtypes)
        return x, acc, q, k

    def leave(p, x, acc, q, k):  # the layer's output carry
        x = tap(x, p)
        return x if probe is None else (x, _probe_record(probe, acc, p[PROBE_INDEX], x, q, k, ops))

    def block(c, layer_params):
        if probe is None:
            return tap(decoder_block(layer_params, c, cos_TK, sin_TK, cfg, ops, attention_dtype, norm_dtypes),
                       layer_params)
        x, acc, q, k = attention(layer_params, c)
        return leave(layer_params, dense_mlp_residual(layer_params, x, cfg, ops, norm_dtypes), acc, q, k)

    def split(c):
        return (c, None) if probe is None else c

    if moe is None:
        x_BTD, probed = split((layer_stack or scan_layers)(block, carry, stacked, min(cfg.scan_unroll, num_layers)))
        return x_BTD, None, probed

    def moe_block(p, p_moe, c):
        x, acc, q, k = attention(p, c)
        with jax.named_scope("mlp_norm"):
            h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps, norm_dtypes.get("mlp_norm"))
        y, stats = moe_math.moe_ffn(p_moe, h, moe.cfg, ops)
        return leave(p, ops.constrain(x + y, ("batch", "seq", "embed")), acc, q, k), stats

    if layer_stack is None:
        out, stats = run_mixed_stack(stacked, moe.params, carry, moe.plan, lambda p, c: block(c, p), moe_block,
                                     cfg.scan_unroll)
    else:
        remat = layer_stack.remat_block  # one policy for every layer (train/remat.py LayerStack)
        out, stats = run_mixed_stack(stacked, moe.params, carry, moe.plan, remat(lambda p, c: block(c, p)),
                                     remat(moe_block))
    x_BTD, probed = split(out)
    return x_BTD, stats, probed


def final_norm(x_BTD: jax.Array, scale_D: jax.Array, cfg: ModelConfig,
               module_dtypes: Mapping[str, jnp.dtype] | None = None) -> jax.Array:
    with jax.named_scope("final_norm"):
        return rms_norm(x_BTD, scale_D, cfg.rms_norm_eps, (module_dtypes or {}).get("final_norm"))


def head_loss(h_BTD: jax.Array, params: Mapping[str, jax.Array], targets_BT: jax.Array, mask_BT: jax.Array,
              cfg: ModelConfig, ops: ParallelOps, head_dtype) -> tuple[jax.Array, jax.Array]:
    """LM head + cross-entropy: (sum of mask * nll, sum of mask * log(Z)^2) over the program's tokens.
    `params` holds (at least) the head's parameter (`head_param`)."""
    with jax.named_scope("head"):
        head = params[head_param(cfg)].astype(head_dtype)
        return ops.cross_entropy(h_BTD.astype(head_dtype), head, targets_BT, mask_BT, cfg.tie_embeddings)
