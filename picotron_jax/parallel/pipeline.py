"""Pipeline parallelism over the `pipe` axis: AFAB, 1F1B and interleaved 1F1B in one SPMD program.

The decoder layers are split into p·v stages of consecutive layers; stage s = c·p + r runs on
pipe rank r as its chunk c (v = 1 except for the interleaved schedule). The embedding is the
first stage's work, final norm + LM head + loss the last stage's. The schedule is a table
computed in Python (`pipeline_schedule.py`); here one `jax.lax.scan` step runs one time slot
inside a `shard_map` that is manual over every mesh axis. Each rank reads its row of the table
(`axis_index('pipe')`) and runs the forward (F) or backward (B) it names under `lax.cond`, so
idle slots cost nothing; at the end of every slot activations move to rank r+1 and
input-gradients to rank r-1 with `ppermute` (a ring, so interleaved chunks wrap around).
Compile time does not grow with m: the scan body is traced once.

Every schedule runs through the same executor (`_run_schedule`): the backward is written by hand
inside the loop. F runs the stage under `jax.vjp` and keeps the pullback's residuals (activations;
under a remat policy only what it saves) per input-buffer slot until the microbatch's B, which rebuilds
the pullback from them and the stage's weights, read again (pipeline_residuals.py), and applies the
gradient that arrived from the next stage: nothing is recomputed unless a remat policy says so.

- AFAB (GPipe, Huang et al. 2019): every forward slot, then every backward slot; the buffers hold
  all m microbatches' residuals, so memory grows with m x activations only. (Differentiating the
  scanned forward slots with `jax.grad` instead stacks the residuals leaving each slot's
  `lax.cond` per slot, the stage weights and the LM head included: one [V, D] table per
  microbatch. Evaluation, which has no backward, still scans the forward slots: `_afab_forward`.)
- 1F1B and interleaved (Narayanan et al. 2019, 2021): the buffers hold at most p - r microbatches on
  rank r for 1F1B: activation memory is bounded by p, not m.

MoE layers (models/moe_layers.py) run inside the stages: each stage holds whole [MoE, dense x (n-1)]
groups, the expert all-to-alls run in the stage, and the stages' MoE stats (each token rank's share:
models/moe.py) are accumulated per microbatch and summed at the end; the balancing losses' gradients
enter each B through the cotangent of those stats.

Tensor, data and expert axes: the shard_map is manual over all of them, so the model runs with
`StageOps` (parallel/ops.py: local attention heads, explicit all-reduces over `tensor` after row-parallel
projections and in the vocabulary-parallel embedding and loss). Parameters enter replicated
over `data` (ZeRO-3 parameters are gathered once at entry) and are cast to vary over the batch
axes so that their gradients stay per-device sums until one psum at the end of the step.
Context: each rank holds T/context columns of every microbatch in the run's layout (zigzag or
contiguous, laid out here) and its attention gathers K/V over `context` (`StageOps`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from picotron_jax.compat import vary as _vary, varying_axes
from picotron_jax.config import Config
from picotron_jax.models.attention import rotary_tables
from picotron_jax.models import llama
from picotron_jax.models.moe_layers import MoEPlan, moe_plan
from picotron_jax.parallel.ops import TOKEN_AXES, StageOps
from picotron_jax.parallel.pipeline_residuals import StageResiduals
from picotron_jax.parallel.pipeline_schedule import Schedule, build_schedule, schedule_of_config
from picotron_jax.parallel.sharding import LOGICAL_RULES, MeshRules, logical_to_spec

(PIPE,) = LOGICAL_RULES["layers"]
(TENSOR,) = LOGICAL_RULES["heads"]
(CONTEXT,) = LOGICAL_RULES["seq"]
STAGED = ("layers", "moe")  # the params held per stage ([L, ...], [L_moe, ...]); the rest: first / last stage's
F32 = jnp.float32


def _zeros_like(x: jax.Array, dtype=F32) -> jax.Array:
    return _vary(jnp.zeros(x.shape, dtype), tuple(sorted(varying_axes(x))))


def _param_specs(rules: MeshRules, logical_axes: Any, shapes: Any) -> Any:
    """shard_map specs: layer params reshaped to [v, p, L/(p·v), ...] with p over `pipe`; all params
    split over `tensor` by the logical rules, replicated over `data` (no ZeRO inside the stage)."""

    def spec(axes, shape, layer: bool):
        if layer:
            return P(None, PIPE, None, *logical_to_spec(axes[1:], rules.mesh, LOGICAL_RULES, shape.shape[1:]))
        return logical_to_spec(axes, rules.mesh, LOGICAL_RULES, shape.shape)

    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    return {k: jax.tree.map(lambda a, s: spec(a, s, k in STAGED), logical_axes[k], shapes[k], is_leaf=is_axes)
            for k in logical_axes}


def _split_axes(spec: P) -> set[str]:
    """The mesh axes a parameter is split over (its gradient is not summed over them)."""
    return {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


def pipeline_loss_and_grads(cfg: Config, rules: MeshRules, spec, compute_dtype=F32,
                            forward_only: bool = False, module_dtypes: Mapping[str, Any] | None = None,
                            head_dtype=None, stage_stacks: Sequence[Callable | None] | None = None,
                            layer_tap_of: Callable | None = None) -> Callable:
    """(params, microbatches [m, B/m, T][, loss seed]) -> (nll sum, z sum, gradient sums), pipelined over
    `pipe`. Stages run the model's own pieces (models/llama.py: `embed_tokens`, `run_layers`, `final_norm`,
    `head_loss`) in the precision policy's dtypes (`compute_dtype`, `module_dtypes`, `head_dtype`;
    train/precision.py). `stage_stacks[s]`: the layer stack (remat policy, train/remat.py) of global stage s,
    None = a plain scan; stages that share one (equal) layer stack share one branch of the stage program.
    `layer_tap_of(fault flags)`: the model's layer tap (the fault injector's in-step faults, train/faults.py),
    given global layer indices; the flags are then the step's fourth argument.

    Sums over all unmasked tokens, like train/step.py's loss_sums; the caller divides. The loss seed
    (default 1) multiplies the backward's starting gradient: the fp16 loss scale over the token count.
    `forward_only` (evaluation): -> (nll sum, z sum), the forward slots of AFAB with one layer chunk
    per rank, whatever the training schedule (a forward has no backward to interleave with)."""
    mesh, mc = rules.mesh, cfg.model
    p = mesh.shape[PIPE]
    sched = build_schedule("afab", p, cfg.pipeline.microbatches) if forward_only else schedule_of_config(cfg, p)
    v, L = sched.v, mc.num_layers
    Lc = L // (p * v)
    cd = jnp.dtype(compute_dtype)
    hd = cd if head_dtype is None else jnp.dtype(head_dtype)
    z_coef = cfg.train.z_loss
    stacks = [None] * (p * v) if forward_only or stage_stacks is None else list(stage_stacks)
    branches = list(dict.fromkeys(stacks))  # distinct layer stacks, in stage order
    branch_of_stage = np.asarray([branches.index(s) for s in stacks], np.int32)
    batch_axes = tuple(a for a in mesh.axis_names if a in TOKEN_AXES)
    act_axes = (PIPE, *batch_axes)  # every activation, buffer and gradient sum varies over these
    param_specs = _param_specs(rules, spec.logical_axes, spec.shapes)
    plan = moe_plan(mc, cfg.moe)  # None: a dense model
    staged = tuple(k for k in STAGED if k in param_specs)
    stage_plan = None if plan is None else MoEPlan(Lc, 0, plan.every_n)  # every stage: Lc / n [MoE, dense x (n-1)]
    tok_spec = rules.activation_spec(("batch", "seq"))
    micro_specs = {k: P(None, *tok_spec) for k in ("inputs", "targets", "mask")}
    tables = {k: np.asarray(t) for k, t in sched.tables.items()}
    kv_replicated = mc.num_kv_heads % mesh.shape[TENSOR] != 0
    context_split = mesh.shape[CONTEXT] > 1

    def local(params, micro, seed, flags, probe_on):
        r = jax.lax.axis_index(PIPE)
        params = jax.tree.map(lambda x: _vary(x, act_axes), params)
        params = {**params, **{s: {k: a[:, 0] for k, a in params[s].items()} for s in staged}}  # [v, Lc, ...]
        b, n = micro["inputs"].shape[1:]  # n = T / context columns, in the sequence layout
        positions_n = order_T = None  # this rank's columns' positions, all columns': arange unless context-parallel
        if context_split:
            order_T = jnp.asarray(rules.sequence_order(n * mesh.shape[CONTEXT]), jnp.int32)
            positions_n = jax.lax.dynamic_slice_in_dim(order_T, jax.lax.axis_index(CONTEXT) * n, n)
        cos_TK, sin_TK = rotary_tables(jnp.arange(n) if positions_n is None else positions_n,
                                       mc.resolved_head_dim, mc.rope_theta)
        ops = StageOps(kv_replicated, positions_n, order_T)

        tap = None if layer_tap_of is None else layer_tap_of(flags)

        def layers_with(stack, probe, chunk, x_bTD, stage):  # -> (y, MoE stats [Gc, ...] or None, probe or None)
            stacked = llama.cast_layers(chunk["layers"], cd, module_dtypes)
            moe = None if plan is None else llama.MoEStack(cfg.moe, stage_plan, llama.cast_moe(chunk["moe"], cd))
            return llama.run_layers(stacked, x_bTD, cos_TK, sin_TK, mc, ops, module_dtypes, stack, tap, moe,
                                    first_layer=stage * Lc, probe=probe)

        def stage_forward(chunk_params, x_bTD, stage, probe=None):
            if len(branches) == 1:
                return layers_with(branches[0], probe, chunk_params, x_bTD, stage)
            fns = [functools.partial(layers_with, stack, probe) for stack in branches]
            return jax.lax.switch(jnp.asarray(branch_of_stage)[stage], fns, chunk_params, x_bTD, stage)

        def cast(chunk):  # a chunk's params in their modules' compute dtypes (the stage's own casts: no-ops)
            out = {"layers": llama.cast_layers(chunk["layers"], cd, module_dtypes)}
            return out if plan is None else {**out, "moe": llama.cast_moe(chunk["moe"], cd)}

        def embed(table_vD, i):
            return llama.embed_tokens(table_vD, micro["inputs"][i], ops, cd, module_dtypes)

        def head_loss(ends, y_bTD, i):
            h_bTD = llama.final_norm(y_bTD, ends["final_norm"], mc, module_dtypes)
            nll, z = llama.head_loss(h_bTD, ends, micro["targets"][i], micro["mask"][i], mc, ops, hd)
            return nll + z_coef * z, (nll, z)

        moe_weights = None  # each microbatch's tokens x the balancing losses' coefficients: their B's seeds
        if plan is not None:
            tokens_m = jax.lax.psum(_vary(jnp.sum(micro["mask"].astype(F32), axis=(1, 2)), batch_axes), batch_axes)
            moe_weights = {"tokens": tokens_m, "aux": cfg.moe.aux_loss, "z": cfg.moe.router_z_loss}
        st = _Stage(sched, {k: jnp.asarray(t) for k, t in tables.items()}, r, llama.head_param(mc), act_axes,
                    _vary(jnp.zeros((b, n, mc.hidden_size), cd), act_axes), stage_forward, embed, head_loss, z_coef,
                    _vary(seed.astype(F32), act_axes), staged, cast, probe_on, positions_n, moe_weights)
        if forward_only:
            _, (nll, z) = _afab_forward(st, params)
            return jax.lax.psum(nll, act_axes), jax.lax.psum(z, act_axes)
        nll, z, grads, probed, moe_sums = _run_schedule(st, params)
        nll, z = jax.lax.psum(nll, act_axes), jax.lax.psum(z, act_axes)

        def total(g, spec, over):  # over the axes the gradient's parameter is not split over (experts: expert)
            return jax.lax.psum(g, tuple(a for a in over if a not in _split_axes(spec)))

        grads = {k: jax.tree.map(lambda g, sp: total(g, sp, batch_axes)[:, None] if k in staged  # this rank's stages
                                 else total(g, sp, act_axes), grads[k], param_specs[k])  # embedding / head
                 for k in grads}
        if moe_sums is not None:  # each token rank's share, summed: the microbatches' token-weighted sums
            moe_sums = {k: jax.lax.psum(a, batch_axes)[:, None] for k, a in moe_sums.items()}
        if probed is not None:  # summed over microbatches, averaged over the token ranks (equal rows each)
            ranks = int(np.prod([mesh.shape[a] for a in batch_axes]))
            over = {"sum": jax.lax.psum, "max": jax.lax.pmax}
            probed = {k: over[rule](probed[k], batch_axes)[:, None] for k, rule in llama.PROBE_COMBINE.items()}
            probed["act_ms"] = probed["act_ms"] / ranks
        return nll, z, grads, probed, moe_sums

    probe_specs = {k: P(None, PIPE) for k in llama.PROBE_FIELDS}  # [v, p, Lc], like the layer gradients
    moe_specs = None if plan is None else {k: P(None, PIPE) for k in MOE_STATS}  # [v, p, Gc, ...]

    def sharded(params, micro, seed, flags, probe_on):
        if forward_only:
            return jax.shard_map(lambda *a: local(*a, None), mesh=mesh, in_specs=(param_specs, micro_specs, P(), P()),
                                 out_specs=(P(), P()))(params, micro, seed, flags)
        if probe_on is None:
            nll, z, grads, moe_sums = jax.shard_map(
                lambda *a: (lambda out: (*out[:3], out[4]))(local(*a, None)), mesh=mesh,
                in_specs=(param_specs, micro_specs, P(), P()),
                out_specs=(P(), P(), param_specs, moe_specs))(params, micro, seed, flags)
            return nll, z, grads, None, moe_sums
        return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, micro_specs, P(), P(), P()),
                             out_specs=(P(), P(), param_specs, probe_specs, moe_specs))(params, micro, seed, flags,
                                                                                         probe_on)

    def loss_and_grads(params, micro, seed=None, fault_flags=None, probe_on=None):
        """-> (nll sum, z sum, gradient sums, probe sums: {act_ms, attn_logit_max} f32[L] or None without
        `probe_on`; act_ms summed over the microbatches, MoE sums: {load [L_moe, E], dropped, aux, z [L_moe]}
        summed over the microbatches, aux and z weighted by each one's tokens as train/moe_aux.py's
        `token_weighted`, or None for a dense model). The microbatches come in the natural column order
        and are laid out here for context parallelism (as train/step.py's `to_sequence_layout`)."""
        stages = {s: {k: a.reshape(v, p, -1, *a.shape[1:]) for k, a in params[s].items()} for s in staged}
        if context_split:
            order_T = rules.sequence_order(micro["inputs"].shape[-1])
            micro = {k: jax.lax.with_sharding_constraint(jnp.take(x, order_T, axis=-1), rules.named(micro_specs[k]))
                     for k, x in micro.items()}
        seed = jnp.ones((), F32) if seed is None else jnp.asarray(seed, F32)
        flags = jnp.zeros((2,), jnp.int32) if fault_flags is None else fault_flags
        if forward_only:
            return sharded({**params, **stages}, micro, seed, flags, None)
        nll, z, grads, probed, moe_sums = sharded({**params, **stages}, micro, seed, flags, probe_on)
        grads = {**grads, **{s: {k: a.reshape(-1, *a.shape[3:]) for k, a in grads[s].items()} for s in staged}}
        if probed is not None:
            probed = {k: a.reshape(L) for k, a in probed.items()}
        if moe_sums is not None:
            moe_sums = {k: a.reshape(-1, *a.shape[3:]) for k, a in moe_sums.items()}
        return nll, z, grads, probed, moe_sums

    return loss_and_grads


MOE_STATS = ("load", "dropped", "aux", "z")  # models/moe.py moe_ffn's stats


def _ring(p: int, step: int) -> list[tuple[int, int]]:
    return [(j, (j + step) % p) for j in range(p)]


@dataclass
class _Stage:
    """What one pipe rank's slot body needs (inside the shard_map)."""

    sched: Schedule
    tables: dict[str, jax.Array]  # name -> int32 [slots, p]
    rank: jax.Array
    head_key: str  # "lm_head", or "embed" when tied
    act_axes: tuple[str, ...]
    zero_act: jax.Array  # [b, T, D] zeros, typed like every activation
    stage_forward: Callable  # (chunk params, x [b, T, D], global stage[, probe]) -> (y [b, T, D], MoE stats, probe)
    embed: Callable  # (table, microbatch) -> x [b, T, D]
    head_loss: Callable  # ({"final_norm", head param}, y, microbatch) -> (objective, (nll, z))
    z_coef: float
    seed: jax.Array  # the backward's starting gradient (1, or the fp16 loss scale / tokens)
    staged: tuple[str, ...]  # the param groups split into stages ("layers", and "moe" in an MoE model)
    cast: Callable  # a chunk's params -> the same in their compute dtypes
    probe_on: jax.Array | None = None  # the monitor's layer probe (models/llama.py LayerProbe); None: off
    positions_n: jax.Array | None = None  # this rank's columns' positions under context parallelism, else None
    moe_weights: dict | None = None  # {"tokens": [m] each microbatch's tokens, "aux", "z": the coefficients}

    def ends(self, params: dict) -> dict:
        """The last stage's parameters: final norm and the head's (the embedding table when tied)."""
        return {"final_norm": params["final_norm"], self.head_key: params[self.head_key]}

    def row(self, xs_t: dict) -> dict:
        return {k: x[self.rank] for k, x in xs_t.items()}

    def zero(self) -> jax.Array:
        return _vary(jnp.zeros((), F32), self.act_axes)

    def chunk(self, params: dict, c: jax.Array) -> dict:
        """One chunk's stage params [Lc, ...] out of [v, Lc, ...]."""
        return {s: {k: jax.lax.dynamic_index_in_dim(a, c, keepdims=False) for k, a in params[s].items()}
                for s in self.staged}

    def weighted_stats(self, stats: dict, i: jax.Array) -> dict:
        """One microbatch's MoE stats with the losses times its tokens (train/moe_aux.py token_weighted)."""
        w = self.moe_weights["tokens"][i]
        return {**stats, "aux": stats["aux"] * w, "z": stats["z"] * w}

    def stats_cotangent(self, types: dict | None, i: jax.Array) -> dict | None:
        """The gradient of the step's objective (times the seed) with respect to a stage's MoE stats (`types`:
        name -> (shape, dtype, varying axes)): the balancing losses enter it as coefficient x tokens x loss;
        the counts are not differentiated."""
        if types is None:
            return None
        seed = self.seed * self.moe_weights["tokens"][i]
        return {k: _vary(jnp.broadcast_to(seed * self.moe_weights[k] if k in ("aux", "z") else 0.0, shape)
                         .astype(dtype), vma) for k, (shape, dtype, vma) in types.items()}


def _afab_forward(st: _Stage, params: dict):
    """The forward slots of an AFAB table: (objective, (nll sum, z sum)) of this rank."""
    s = st.sched
    last_f = max(t for t in range(s.num_slots) if any(w is not None for w in s.forward[t]))
    xs = {k: st.tables[k][: last_f + 1] for k in ("f_on", "f_mb", "f_first", "f_last")}
    p = s.p
    zero = st.zero()
    stage_params = {s: {k: a[0] for k, a in params[s].items()} for s in st.staged}  # v = 1: one chunk per rank

    def slot(carry, xs_t):
        x_recv, nll, z = carry
        row = st.row(xs_t)
        i = row["f_mb"]

        def forward(x_recv):
            x = jax.lax.cond(row["f_first"], lambda: st.embed(params["embed"], i), lambda: x_recv)
            y, _, _ = st.stage_forward(stage_params, x, st.rank)

            def loss(y):
                _, (nll, z) = st.head_loss(st.ends(params), y, i)
                return st.zero_act, nll, z

            return jax.lax.cond(row["f_last"], loss, lambda y: (y, zero, zero), y)

        send, dnll, dz = jax.lax.cond(row["f_on"], forward, lambda x: (st.zero_act, zero, zero), x_recv)
        # AFAB's forward phase runs microbatch i on stage s in slot s + i: what arrives is the next input
        return (jax.lax.ppermute(send, PIPE, _ring(p, 1)), nll + dnll, z + dz), None

    (_, nll, z), _ = jax.lax.scan(slot, (st.zero_act, zero, zero), xs)
    return nll + st.z_coef * z, (nll, z)


def _run_schedule(st: _Stage, params: dict):
    """AFAB / 1F1B / interleaved: F and B written out per slot; B runs the pullback F saved (its residuals
    kept per input-buffer slot, the weights re-read: pipeline_residuals.py), so nothing is recomputed unless a
    remat policy says so.

    Carry: `acts` [Na, b, T, D] stage inputs (arrived, or waiting for their F), `saved` the residuals of the
    microbatches between their F and B (per leaf [Na, ...]), `grads_in` [Ng, b, T, D] input-gradients from the
    next stage (or the loss), and f32 gradient sums."""
    s, p = st.sched, st.sched.p
    b_T_D = st.zero_act.shape
    acc = jax.tree.map(_zeros_like, params)
    carry = {
        "acts": _vary(jnp.zeros((s.act_slots, *b_T_D), st.zero_act.dtype), st.act_axes),
        "grads_in": _vary(jnp.zeros((s.grad_slots, *b_T_D), st.zero_act.dtype), st.act_axes),
        "grads": acc, "nll": st.zero(), "z": st.zero(),
    }
    if st.probe_on is not None:  # per chunk and layer of this rank: [v, Lc]
        lc = jax.tree.leaves(params["layers"])[0].shape[1]
        carry["probe"] = {k: _vary(jnp.zeros((s.v, lc), F32), st.act_axes) for k in llama.PROBE_FIELDS}
    probe = None if st.probe_on is None else llama.LayerProbe(st.probe_on, st.positions_n)

    def stage_fn(chunk_c, x, stage):  # -> ((y, MoE stats), probe stats): differentiated in chunk_c and x
        y, stats, probed = st.stage_forward(chunk_c, x, stage, probe)
        return (y, stats), probed

    residuals = StageResiduals(stage_fn, st.act_axes)
    carry["saved"] = residuals.buffers(st.cast(st.chunk(params, 0)), st.zero_act, st.rank, s.act_slots)
    if st.moe_weights is not None:  # per chunk and MoE layer of this rank: [v, Gc, ...]
        carry["moe"] = {k: _vary(jnp.zeros((s.v, *shape), F32), st.act_axes)
                        for k, (shape, _, _) in residuals.out_types[1].items()}

    def forward(row, c):
        i = row["f_mb"]
        x = jax.lax.cond(row["f_first"], lambda: st.embed(params["embed"], i), lambda: c["acts"][row["f_buf"]])
        k, stage = row["f_chunk"], row["f_chunk"] * p + st.rank
        (y, stats), probed, saved = residuals.save(c["saved"], row["f_buf"], st.cast(st.chunk(params, k)), x, stage)
        c = {**c, "saved": saved}
        if probed is not None:
            at = {"sum": lambda a, x: a.at[k].add(x), "max": lambda a, x: a.at[k].max(x)}
            c = {**c, "probe": {n: at[rule](c["probe"][n], probed[n]) for n, rule in llama.PROBE_COMBINE.items()}}
        if stats is not None:
            weighted = st.weighted_stats(stats, i)
            c = {**c, "moe": {n: a.at[k].add(weighted[n]) for n, a in c["moe"].items()}}

        def loss(c, y):  # last stage: loss, and its gradient for this microbatch's B
            head_fn = lambda ends, y: st.head_loss(ends, y, i)  # noqa: E731
            obj, vjp, (nll, z) = jax.vjp(head_fn, st.ends(params), y, has_aux=True)
            d_ends, dy = vjp(st.seed.astype(obj.dtype))
            grads = {**c["grads"], **{k: c["grads"][k] + g for k, g in d_ends.items()}}
            c = {**c, "grads_in": c["grads_in"].at[row["f_gbuf"]].set(dy.astype(y.dtype)),
                 "grads": grads, "nll": c["nll"] + nll, "z": c["z"] + z}
            return c, st.zero_act

        return jax.lax.cond(row["f_last"], loss, lambda c, y: (c, y), c, y)

    def backward(row, c):
        i, k = row["b_mb"], row["b_chunk"]
        dy = c["grads_in"][row["b_gbuf"]]
        pullback = residuals.pullback(c["saved"], row["b_buf"], st.cast(st.chunk(params, k)))
        d_chunk, dx = pullback((dy, st.stats_cotangent(residuals.out_types[1], i)))
        staged = {g: {n: a.at[k].add(d_chunk[g][n].astype(F32)) for n, a in c["grads"][g].items()} for g in st.staged}
        c = {**c, "grads": {**c["grads"], **staged}}

        def to_embedding(c, dx):  # first stage: the gradient reaches the embedding table
            _, vjp = jax.vjp(lambda table: st.embed(table, i), params["embed"])
            (d_table,) = vjp(dx)
            return {**c, "grads": {**c["grads"], "embed": c["grads"]["embed"] + d_table}}, st.zero_act

        return jax.lax.cond(row["b_first"], to_embedding, lambda c, dx: (c, dx), c, dx)

    def slot(c, xs_t):
        row = st.row(xs_t)
        c, send_f = jax.lax.cond(row["f_on"], functools.partial(forward, row), lambda c: (c, st.zero_act), c)
        c, send_b = jax.lax.cond(row["b_on"], functools.partial(backward, row), lambda c: (c, st.zero_act), c)
        recv_f = jax.lax.ppermute(send_f, PIPE, _ring(p, 1))  # activations to the next stage
        recv_b = jax.lax.ppermute(send_b, PIPE, _ring(p, -1))  # input-gradients to the previous stage
        ka, kg = row["recv_act_buf"], row["recv_grad_buf"]
        acts = c["acts"].at[ka].set(jnp.where(row["recv_act_on"] > 0, recv_f, c["acts"][ka]))
        grads_in = c["grads_in"].at[kg].set(jnp.where(row["recv_grad_on"] > 0, recv_b, c["grads_in"][kg]))
        return {**c, "acts": acts, "grads_in": grads_in}, None

    c, _ = jax.lax.scan(slot, carry, st.tables)
    return c["nll"], c["z"], c["grads"], c.get("probe"), c.get("moe")
