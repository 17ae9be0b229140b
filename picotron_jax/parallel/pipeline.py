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
inside the loop. Each rank keeps a buffer of the *inputs* of microbatches that ran F but not yet
B; B recomputes the stage forward under `jax.vjp` and applies the gradient that arrived from the
next stage.

- AFAB (GPipe, Huang et al. 2019): every forward slot, then every backward slot; the buffer holds
  all m microbatch inputs, so memory grows with m x activations only. (Differentiating the
  scanned forward slots with `jax.grad` instead stacks the residuals leaving each slot's
  `lax.cond` per slot, the stage weights and the LM head included: one [V, D] table per
  microbatch. Evaluation, which has no backward, still scans the forward slots: `_afab_forward`.)
- 1F1B and interleaved (Narayanan et al. 2019, 2021): the buffer holds at most p - r inputs on
  rank r for 1F1B: activation memory is bounded by p, not m.

Tensor, data and expert axes: the shard_map is manual over all of them, so the model runs with
`StageOps` (parallel/ops.py: local attention heads, explicit all-reduces over `tensor` after row-parallel
projections and in the vocabulary-parallel embedding and loss). Parameters enter replicated
over `data` (ZeRO-3 parameters are gathered once at entry) and are cast to vary over the batch
axes so that their gradients stay per-device sums until one psum at the end of the step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from picotron_jax.compat import varying_axes
from picotron_jax.config import Config
from picotron_jax.models.attention import rotary_tables
from picotron_jax.models.llama import decoder_layers, rms_norm
from picotron_jax.parallel.ops import STAGE_OPS
from picotron_jax.parallel.pipeline_schedule import Schedule, build_schedule, schedule_of_config
from picotron_jax.parallel.sharding import LOGICAL_RULES, MeshRules, logical_to_spec
from picotron_jax.parallel.vocab import local_xent

(PIPE,) = LOGICAL_RULES["layers"]
# every axis a microbatch's rows or columns are split over: activations and gradient sums vary over them
TOKEN_AXES = tuple(dict.fromkeys(LOGICAL_RULES["batch"] + LOGICAL_RULES["seq"]))
F32 = jnp.float32


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark x as varying over `axes` (shard_map's type system), where it does not vary yet."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


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
    out = {k: jax.tree.map(lambda a, s: spec(a, s, False), logical_axes[k], shapes[k], is_leaf=is_axes)
           for k in logical_axes if k != "layers"}
    out["layers"] = jax.tree.map(lambda a, s: spec(a, s, True), logical_axes["layers"], shapes["layers"],
                                 is_leaf=is_axes)
    return out


def pipeline_loss_and_grads(cfg: Config, rules: MeshRules, spec, compute_dtype=F32,
                            forward_only: bool = False) -> Callable:
    """(params, microbatches [m, B/m, T]) -> (nll sum, z sum, gradient sums), pipelined over `pipe`;
    stages compute in `compute_dtype` (the precision policy's, train/precision.py).

    Sums over all unmasked tokens, like train/step.py's loss_sums; the caller divides.
    `forward_only` (evaluation): -> (nll sum, z sum), the forward slots of AFAB with one layer chunk
    per rank, whatever the training schedule (a forward has no backward to interleave with)."""
    mesh, mc = rules.mesh, cfg.model
    p = mesh.shape[PIPE]
    sched = build_schedule("afab", p, cfg.pipeline.microbatches) if forward_only else schedule_of_config(cfg, p)
    v, L = sched.v, mc.num_layers
    Lc = L // (p * v)
    cd = jnp.dtype(compute_dtype)
    z_coef = cfg.train.z_loss
    head_key = "embed" if mc.tie_embeddings else "lm_head"
    head_spec = "btd,vd->btv" if mc.tie_embeddings else "btd,dv->btv"
    batch_axes = tuple(a for a in mesh.axis_names if a in TOKEN_AXES)
    act_axes = (PIPE, *batch_axes)  # every activation, buffer and gradient sum varies over these
    param_specs = _param_specs(rules, spec.logical_axes, spec.shapes)
    tok_spec = rules.activation_spec(("batch", "seq"))
    micro_specs = {k: P(None, *tok_spec) for k in ("inputs", "targets", "mask")}
    tables = {k: np.asarray(t) for k, t in sched.tables.items()}

    def local(params, micro):
        r = jax.lax.axis_index(PIPE)
        params = jax.tree.map(lambda x: _vary(x, act_axes), params)
        params = {**params, "layers": {k: a[:, 0] for k, a in params["layers"].items()}}  # [v, Lc, ...]
        b, T = micro["inputs"].shape[1:]
        cos_TK, sin_TK = rotary_tables(jnp.arange(T), mc.resolved_head_dim, mc.rope_theta)

        def stage_forward(chunk_params, x_bTD):
            stacked = {k: a if k.endswith("_norm") else a.astype(cd) for k, a in chunk_params.items()}  # norms: fp32
            return decoder_layers(stacked, x_bTD, cos_TK, sin_TK, mc, STAGE_OPS)

        def embed(table_vD, i):
            with jax.named_scope("embed"):  # named scopes: the profiler's modules (picotron_jax/profile)
                return STAGE_OPS.embed(table_vD.astype(cd), micro["inputs"][i])

        def head_loss(final_norm, head, y_bTD, i):
            with jax.named_scope("final_norm"):
                h_bTD = rms_norm(y_bTD, final_norm, mc.rms_norm_eps)
            with jax.named_scope("head"):
                nll, z = local_xent(head_spec, h_bTD, head.astype(cd), micro["targets"][i],
                                     micro["mask"][i].astype(F32))
                return nll + z_coef * z, (nll, z)

        st = _Stage(sched, {k: jnp.asarray(t) for k, t in tables.items()}, r, head_key, act_axes,
                    _vary(jnp.zeros((b, T, mc.hidden_size), cd), act_axes), stage_forward, embed, head_loss, z_coef)
        if forward_only:
            _, (nll, z) = _afab_forward(st, params)
            return jax.lax.psum(nll, act_axes), jax.lax.psum(z, act_axes)
        nll, z, grads = _run_schedule(st, params)
        nll, z = jax.lax.psum(nll, act_axes), jax.lax.psum(z, act_axes)
        layer_grads = {k: jax.lax.psum(g, batch_axes)[:, None] for k, g in grads.pop("layers").items()}
        grads = {k: jax.lax.psum(g, act_axes) for k, g in grads.items()}  # embedding / head: first / last rank
        return nll, z, {**grads, "layers": layer_grads}

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(param_specs, micro_specs),
                            out_specs=(P(), P()) if forward_only else (P(), P(), param_specs))

    def loss_and_grads(params, micro):
        layers = {k: a.reshape(v, p, Lc, *a.shape[1:]) for k, a in params["layers"].items()}
        if forward_only:
            return sharded({**params, "layers": layers}, micro)
        nll, z, grads = sharded({**params, "layers": layers}, micro)
        grads["layers"] = {k: a.reshape(L, *a.shape[3:]) for k, a in grads["layers"].items()}
        return nll, z, grads

    return loss_and_grads


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
    stage_forward: Callable  # (chunk params [Lc, ...], x [b, T, D]) -> y [b, T, D]
    embed: Callable  # (table, microbatch) -> x [b, T, D]
    head_loss: Callable  # (final_norm, head, y, microbatch) -> (objective, (nll, z))
    z_coef: float

    def row(self, xs_t: dict) -> dict:
        return {k: x[self.rank] for k, x in xs_t.items()}

    def zero(self) -> jax.Array:
        return _vary(jnp.zeros((), F32), self.act_axes)


def _chunk(layers: dict, c: jax.Array) -> dict:
    """One chunk's layers [Lc, ...] out of [v, Lc, ...]."""
    return {k: jax.lax.dynamic_index_in_dim(a, c, keepdims=False) for k, a in layers.items()}


def _afab_forward(st: _Stage, params: dict):
    """The forward slots of an AFAB table: (objective, (nll sum, z sum)) of this rank."""
    s = st.sched
    last_f = max(t for t in range(s.num_slots) if any(w is not None for w in s.forward[t]))
    xs = {k: st.tables[k][: last_f + 1] for k in ("f_on", "f_mb", "f_first", "f_last")}
    p = s.p
    zero = st.zero()
    stage_params = {k: a[0] for k, a in params["layers"].items()}  # v = 1: one chunk per rank

    def slot(carry, xs_t):
        x_recv, nll, z = carry
        row = st.row(xs_t)
        i = row["f_mb"]

        def forward(x_recv):
            x = jax.lax.cond(row["f_first"], lambda: st.embed(params["embed"], i), lambda: x_recv)
            y = st.stage_forward(stage_params, x)

            def loss(y):
                _, (nll, z) = st.head_loss(params["final_norm"], params[st.head_key], y, i)
                return st.zero_act, nll, z

            return jax.lax.cond(row["f_last"], loss, lambda y: (y, zero, zero), y)

        send, dnll, dz = jax.lax.cond(row["f_on"], forward, lambda x: (st.zero_act, zero, zero), x_recv)
        # AFAB's forward phase runs microbatch i on stage s in slot s + i: what arrives is the next input
        return (jax.lax.ppermute(send, PIPE, _ring(p, 1)), nll + dnll, z + dz), None

    (_, nll, z), _ = jax.lax.scan(slot, (st.zero_act, zero, zero), xs)
    return nll + st.z_coef * z, (nll, z)


def _run_schedule(st: _Stage, params: dict):
    """AFAB / 1F1B / interleaved: F and B written out per slot; B recomputes the stage from its stored input.

    Carry: `acts` [Na, b, T, D] stage inputs (arrived, or waiting for their B), `grads_in`
    [Ng, b, T, D] input-gradients from the next stage (or the loss), and f32 gradient sums."""
    s, p = st.sched, st.sched.p
    b_T_D = st.zero_act.shape
    acc = jax.tree.map(_zeros_like, params)
    carry = {
        "acts": _vary(jnp.zeros((s.act_slots, *b_T_D), st.zero_act.dtype), st.act_axes),
        "grads_in": _vary(jnp.zeros((s.grad_slots, *b_T_D), st.zero_act.dtype), st.act_axes),
        "layers": acc["layers"], "embed": acc["embed"], "final_norm": acc["final_norm"],
        "head": acc[st.head_key], "nll": st.zero(), "z": st.zero(),
    }

    def forward(row, c):
        i = row["f_mb"]
        x = jax.lax.cond(row["f_first"], lambda: st.embed(params["embed"], i), lambda: c["acts"][row["f_buf"]])
        c = {**c, "acts": c["acts"].at[row["f_buf"]].set(x)}
        y = st.stage_forward(_chunk(params["layers"], row["f_chunk"]), x)

        def loss(c, y):  # last stage: loss, and its gradient for this microbatch's B
            head_fn = lambda norm, head, y: st.head_loss(norm, head, y, i)  # noqa: E731
            obj, vjp, (nll, z) = jax.vjp(head_fn, params["final_norm"], params[st.head_key], y, has_aux=True)
            d_norm, d_head, dy = vjp(jnp.ones_like(obj))
            c = {**c, "grads_in": c["grads_in"].at[row["f_gbuf"]].set(dy.astype(y.dtype)),
                 "final_norm": c["final_norm"] + d_norm, "head": c["head"] + d_head,
                 "nll": c["nll"] + nll, "z": c["z"] + z}
            return c, st.zero_act

        return jax.lax.cond(row["f_last"], loss, lambda c, y: (c, y), c, y)

    def backward(row, c):
        i, k = row["b_mb"], row["b_chunk"]
        x, dy = c["acts"][row["b_buf"]], c["grads_in"][row["b_gbuf"]]
        _, vjp = jax.vjp(st.stage_forward, _chunk(params["layers"], k), x)
        d_chunk, dx = vjp(dy)
        layers = {n: g.at[k].add(d_chunk[n].astype(F32)) for n, g in c["layers"].items()}
        c = {**c, "layers": layers}

        def to_embedding(c, dx):  # first stage: the gradient reaches the embedding table
            _, vjp = jax.vjp(lambda table: st.embed(table, i), params["embed"])
            (d_table,) = vjp(dx)
            return {**c, "embed": c["embed"] + d_table}, st.zero_act

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
    grads = {"layers": c["layers"], "embed": c["embed"], "final_norm": c["final_norm"]}
    if st.head_key == "lm_head":
        grads["lm_head"] = c["head"]
    else:
        grads["embed"] = grads["embed"] + c["head"]
    return c["nll"], c["z"], grads
