"""NaN origin: replay one step with a finite-value check after every operation and name the first one
that produced a non-finite value (module, layer, forward or backward, source line, input statistics).

The step's gradient function (forward and backward, with the run's in-step fault flags) is traced
to a jaxpr on a single device (the layout does not change what is computed; `checkify` breaks inside
`shard_map`, jax issues 23946 and 26887), and the jaxpr is evaluated here equation by equation. The
layer scan is unrolled: an equation inside it is reported with its layer index; scans of the
backward pass (transposed) are reported as "backward". Nested programs (pjit, custom_jvp/vjp,
remat) are entered; other control flow is evaluated as one operation. The first equation whose
output holds a NaN/inf while none of its variable inputs does is the origin.

`picotron-jax debug nan RUN_DIR --step K` restores the newest checkpoint before step K, steps up to
K - 1, and traces step K on the batch it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from picotron_jax import compat

_ENTER = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr",
          "checkpoint": "jaxpr", "custom_lin": None}


@dataclass
class Origin:
    """Where the first non-finite value appeared."""

    primitive: str
    scope: str  # the named scope (module): "layers/attention", "head", ...
    layer: int | None  # the decoder layer (scan iteration), None outside the layer scan
    direction: str  # forward | backward
    source: str  # file:line of the operation
    inputs: list[dict] = field(default_factory=list)  # shape, dtype and statistics of each input

    def describe(self) -> str:
        where = f"decoder layer {self.layer}" if self.layer is not None else "outside the decoder layers"
        stats = "; ".join(
            f"input {i}: {s['dtype']}{s['shape']} finite {s['finite']:.0%}"
            + (f", min {s['min']:.4g}, max {s['max']:.4g}, mean |x| {s['mean_abs']:.4g}" if s.get("min") is not None
               else "") for i, s in enumerate(self.inputs))
        return (f"first non-finite value: {self.primitive} in {self.direction} pass, {where}, module "
                f"{self.scope or '(top level)'}, at {self.source}\n  {stats}")


def _finite(x) -> bool:
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)):
        return True
    return bool(np.isfinite(a).all())


def _stats(x) -> dict:
    a = np.asarray(x)
    out = {"shape": list(a.shape), "dtype": str(a.dtype), "finite": 1.0}
    if a.size and np.issubdtype(a.dtype, np.floating):
        ok = np.isfinite(a)
        out["finite"] = float(ok.mean())
        if ok.any():
            good = a[ok].astype(np.float64)
            out.update(min=float(good.min()), max=float(good.max()), mean_abs=float(np.abs(good).mean()))
    return out


def _source(eqn, outer: str) -> str:
    """file:line of the user code that made `eqn` (that of the enclosing call when `eqn` is library-internal)."""
    frame = compat.user_frame(eqn.source_info.traceback)
    return f"{Path(frame.file_name).name}:{frame.start_line}" if frame is not None else outer


class _Found(Exception):
    def __init__(self, origin: Origin):
        self.origin = origin


def _eval(jaxpr, consts, args, tainted, layer, stack: str, src: str = "unknown"):
    """Evaluate `jaxpr`; `tainted[i]`: argument i holds a non-finite value computed earlier (not a constant)."""
    env: dict = {}
    bad: set = set()  # variables holding non-finite values computed by an equation (or tainted arguments)

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, t in zip(jaxpr.invars, args, tainted):
        env[v] = x
        if t:
            bad.add(v)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        in_bad = [not isinstance(v, jcore.Literal) and v in bad for v in eqn.invars]
        name = eqn.primitive.name
        scope = "/".join(filter(None, (stack, str(eqn.source_info.name_stack))))
        if name == "scan":
            outs = _scan(eqn, ins, in_bad, scope, _source(eqn, src))
        elif name in _ENTER and eqn.params.get(_ENTER[name] or "", None) is not None:
            inner = eqn.params[_ENTER[name]]
            closed = inner if hasattr(inner, "consts") else jcore.ClosedJaxpr(inner, ())
            outs = _eval(closed.jaxpr, closed.consts, ins, in_bad, layer, scope, _source(eqn, src))
        else:
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))  # as jax.core.eval_jaxpr
            outs = outs if eqn.primitive.multiple_results else [outs]
            if not any(in_bad) and not all(_finite(x) for x in outs):
                direction = "backward" if "transpose" in scope else "forward"
                raise _Found(Origin(name, _clean(scope), layer, direction, _source(eqn, src), [_stats(x) for x in ins]))
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
            if not _finite(x):
                bad.add(v)
    return [read(v) for v in jaxpr.outvars]


def _clean(scope: str) -> str:
    """'transpose(jvp(layers))/attention' -> 'layers/attention' (the module path, without the AD wrappers)."""
    parts = []
    for p in scope.split("/"):
        while "(" in p and p.endswith(")"):
            p = p[p.index("(") + 1:-1]
        if p and p not in ("jvp", "transpose", "vmap", "remat", "checkpoint", "while", "body", "scan"):
            parts.append(p)
    return "/".join(parts)


def _scan(eqn, ins, in_bad, scope, src):
    p = eqn.params
    body = p["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], list(ins[nc:nc + nk]), ins[nc + nk:]
    bad_consts, bad_xs = in_bad[:nc], in_bad[nc + nk:]
    order = range(p["length"] - 1, -1, -1) if p["reverse"] else range(p["length"])
    ys: dict[int, list] = {}
    for i in order:
        taint = [*bad_consts, *(not _finite(c) for c in carry), *(b and not _finite(x[i]) for b, x in zip(bad_xs, xs))]
        outs = _eval(body.jaxpr, body.consts, [*consts, *carry, *(x[i] for x in xs)], taint, i, scope, src)
        carry, ys[i] = list(outs[:nk]), outs[nk:]
    stacked = [jnp.stack([ys[i][k] for i in range(p["length"])]) for k in range(len(eqn.outvars) - nk)]
    return [*carry, *stacked]


def trace_nan(fn, *args) -> Origin | None:
    """Evaluate `fn(*args)` operation by operation; the first operation producing a non-finite value."""
    closed = jax.make_jaxpr(fn)(*args)
    try:
        with jax.disable_jit():
            leaves = jax.tree.leaves(args)
            _eval(closed.jaxpr, closed.consts, leaves, [not _finite(x) for x in leaves], None, "")
    except _Found as found:
        return found.origin
    return None


def single_device_grad_fn(cfg):
    """(grad fn, setup) of `cfg` on one device: params, batch, loss scale, fault flags -> (metrics, grads)."""
    from picotron_jax.run import build_run
    from picotron_jax.train.step import make_grad_fn

    one = cfg.replace(mesh={"pipe": 1, "data": 1, "context": 1, "expert": 1, "tensor": 1, "num_devices": 1},
                      train={"grad_accum": 1})
    run = build_run(one, data=False, devices=[jax.devices()[0]])
    return make_grad_fn(one, run.rules, run.setup), run.setup


def trace_step(cfg, params, batch, fault_flags=None) -> Origin | None:
    """Trace one training step's forward and backward on host copies of `params` and `batch`."""
    fn, setup = single_device_grad_fn(cfg)
    params = jax.device_put(jax.device_get(params), setup.shardings.params)
    batch = {k: jnp.asarray(jax.device_get(v)) for k, v in batch.items()}
    flags = None if fault_flags is None else jnp.asarray(fault_flags)
    return trace_nan(lambda p, b, f: fn(p, b, None, f), params, batch, flags)


def replay_and_trace(run_dir: str | Path, step: int, say=print) -> Origin | None:
    """Restore the newest checkpoint of RUN_DIR before `step`, step up to step - 1, trace step `step`."""
    from picotron_jax.debug.replay import load_run

    cfg, location = load_run(run_dir)
    return replay_and_trace_at(cfg, location, step, say)


def replay_and_trace_at(cfg, location: str, step: int, say=print) -> Origin | None:
    """`replay_and_trace` for a config and its checkpoint folder (the automatic mode calls it mid-run)."""
    from picotron_jax.debug.replay import trainer_before

    trainer, start = trainer_before(cfg, location, step, "debug nan")
    try:
        faults = trainer.built.faults
        flags = None if faults is None else faults.flags(step)
        say(f"replaying step {step} from checkpoint {start} on batch {step - 1}, every operation checked")
        return trace_step(cfg, trainer.params, trainer.batch(step - 1), flags)
    finally:
        trainer.close()
