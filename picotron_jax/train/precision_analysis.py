"""Choose each module's precision by measurement (`picotron-jax precision analyze`).

For every module m and low dtype d (bf16 or fp16) the step's loss and gradients are computed with
m alone in d and everything else in fp32, on a few batches, and compared with the all-fp32 run:

- `out_rel_err`: relative L2 error of m's output (all layers; the decoder modules' outputs are read
  at their `checkpoint_name` tags), or of the loss for modules without a tag (embed, final_norm, head);
- `grad_rel_err`: relative L2 error of m's weight gradient (for the attention core, of the gradient
  arriving at its output);
- headroom, from the fp32 run: max |output|, and max |weight gradient| and max |output gradient|
  times the loss scale (fp16 scales the backward pass), against the dtype's largest finite value;
- `overflow`: the low-precision run produced a non-finite gradient.

A module needs fp32 when it overflows, has less than 2x headroom, or its errors exceed the
tolerances. The result is a policy YAML (`mode`, `modules`, `measurements`) that
`precision.policy_file` trains with. Tags are read by re-evaluating each layer's jaxpr with a
zero "probe" added at every tag, so d(loss)/d(probe) is the gradient at that module's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.extend import core as jex_core

from picotron_jax.config import Config
from picotron_jax.models.llama import scan_layers
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train import precision as mp
from picotron_jax.train.state import StateSetup
from picotron_jax.train.step import make_loss_sums

LOW_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}
HEADROOM = 2.0  # a module needs fp32 when its largest value is within 2x of the dtype's largest finite value
TAG_OF_MODULE = {f"layers.{tag}": tag for tag in
                 ("attn_norm", "wq", "wk", "wv", "attention", "wo", "mlp_norm", "w_gate", "w_up", "w_down")}


@dataclass
class ModuleReport:
    module: str
    dtype: str
    out_rel_err: float
    grad_rel_err: float
    max_abs_out: float  # fp32 run; nan where the module has no tag
    max_scaled_grad: float  # fp32 run, x loss scale: largest of weight and output gradients
    overflow: bool
    needs_fp32: bool
    why: str


def eval_jaxpr_with_probes(jaxpr, consts, args, on_tag: Callable[[str, jax.Array], jax.Array]) -> list:
    """Evaluate `jaxpr`, passing the output of every checkpoint_name tag through `on_tag(name, x)`
    (JAX's custom-interpreter pattern: bind each equation's primitive again)."""
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]  # noqa: E731
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params))
        out = list(out) if eqn.primitive.multiple_results else [out]
        if eqn.primitive.name == "name":
            out = [on_tag(eqn.params["name"], out[0])]
        env.update(zip(eqn.outvars, out))
    return [read(v) for v in jaxpr.outvars]


def probed_layer_stack(probes: dict[str, jax.Array] | None, record: dict):
    """A layer_stack that adds probes[tag][l] to each tag's output in layer l and records the outputs
    ([L, ...] per tag) in `record['outputs']`; with probes None it only records the tags' shapes."""

    def stack(block, x_BTD, stacked, unroll):
        def body(x, inputs):
            p, e = inputs
            closed = jax.make_jaxpr(block)(x, p)
            outputs = {}

            def on_tag(name, y):
                outputs[name] = y
                return y if e is None else y + e[name].astype(y.dtype)

            (x,) = eval_jaxpr_with_probes(closed.jaxpr, closed.consts, jax.tree.leaves((x, p)), on_tag)
            return x, outputs

        if probes is None:
            _, outputs = body(x_BTD, (jax.tree.map(lambda a: a[0], stacked), None))
            record["shapes"] = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in outputs.items()}
            return scan_layers(block, x_BTD, stacked, unroll)
        x_BTD, record["outputs"] = jax.lax.scan(body, x_BTD, (stacked, probes))
        return x_BTD

    return stack


def make_probed_grads(cfg: Config, rules: MeshRules, setup: StateSetup, policy: mp.PrecisionPolicy, L: int,
                      probe_shapes: dict):
    """Jitted (params, batch, scale) -> (mean loss, tag outputs, weight grads, output grads), gradients of
    scale x mean loss divided by scale (fp32), as the fp16 train step computes them."""

    def loss(params, probes, batch, scale):
        record: dict = {}
        sums = make_loss_sums(cfg, rules, setup.spec.graphdef, policy, probed_layer_stack(probes, record))
        objective, (nll, *_) = sums(params, batch)
        tokens = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
        return objective * scale / tokens, (nll / tokens, record["outputs"])

    def run(params, batch, scale):
        probes = {k: jnp.zeros((L, *s.shape), s.dtype) for k, s in probe_shapes.items()}
        (_, (mean_loss, outputs)), (g_params, g_probes) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, probes, batch, scale)
        unscale = lambda t: jax.tree.map(lambda g: g.astype(jnp.float32) / scale, t)  # noqa: E731
        return mean_loss, jax.tree.map(lambda o: o.astype(jnp.float32), outputs), unscale(g_params), unscale(g_probes)

    return jax.jit(run)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def analyze(cfg: Config, rules: MeshRules, setup: StateSetup, params: Any, batches: list, low: Iterable[str],
            modules: Iterable[str] = mp.MODULES, out_tol: float = 0.05, grad_tol: float = 0.1,
            log: Callable[[str], None] | None = None) -> list[ModuleReport]:
    devices = list(rules.mesh.devices.flat)
    fp32 = mp.PrecisionPolicy(mode="fp32", reason="analysis reference", compute_dtype="float32")
    L = cfg.model.num_layers
    record: dict = {}
    jax.eval_shape(make_loss_sums(cfg, rules, setup.spec.graphdef, fp32, probed_layer_stack(None, record)),
                   params, batches[0])
    shapes = {k: jax.ShapeDtypeStruct(s.shape, jnp.float32) for k, s in record["shapes"].items()}
    reference = make_probed_grads(cfg, rules, setup, fp32, L, shapes)
    refs = [jax.device_get(reference(params, b, 1.0)) for b in batches]
    reports = []
    for d in low:
        scale = cfg.precision.loss_scale_init if d == "fp16" else 1.0
        dtype_max = float(jnp.finfo(LOW_DTYPES[d]).max)
        for module in modules:
            if module not in mp.MODULES:
                raise ValueError(module)
            if devices[0].platform == "cpu" and module == "layers.attention" and d == "fp16":
                nan = float("nan")  # train/precision.py runs it in fp32 there anyway
                reports.append(ModuleReport(module, d, nan, nan, nan, nan, False, True,
                                            "XLA:CPU has no f16 attention dots with f32 sums"))
                if log:
                    log(_describe(reports[-1]))
                continue
            policy = fp32.with_modules({module: jnp.dtype(LOW_DTYPES[d]).name})
            fn = make_probed_grads(cfg, rules, setup, policy, L, shapes)
            reports.append(_measure(module, d, [jax.device_get(fn(params, b, scale)) for b in batches], refs,
                                    scale, dtype_max, out_tol, grad_tol))
            if log:
                log(_describe(reports[-1]))
    return reports


def _measure(module, d, runs, refs, scale, dtype_max, out_tol, grad_tol) -> ModuleReport:
    tag = TAG_OF_MODULE.get(module)
    param_path = mp.PARAM_OF_MODULE.get(module)
    out_err, grad_err, max_out, max_grad, overflow = [], [], [], [], False
    for (loss, outs, g, ge), (rloss, routs, rg, rge) in zip(runs, refs):
        leaves = jax.tree.leaves((loss, g))
        overflow |= not all(np.all(np.isfinite(x)) for x in leaves)
        out_err.append(_rel(outs[tag], routs[tag]) if tag else abs(float(loss) - float(rloss)) / abs(float(rloss)))
        mine, ref = (_pick(g, param_path), _pick(rg, param_path)) if param_path else (ge[tag], rge[tag])
        grad_err.append(_rel(mine, ref) if mine is not None else float("nan"))
        max_out.append(float(np.max(np.abs(routs[tag]))) if tag else float("nan"))
        grads = [x for x in (_pick(rg, param_path) if param_path else None, rge.get(tag) if tag else None)
                 if x is not None]
        max_grad.append(scale * max(float(np.max(np.abs(x))) for x in grads) if grads else float("nan"))
    out_e, grad_e = float(np.nanmax(out_err)), float(np.nanmax(grad_err))
    mo, mg = float(np.nanmax(max_out)) if tag else float("nan"), float(np.nanmax(max_grad))
    reasons = []
    if overflow:
        reasons.append(f"non-finite gradients in {d}")
    if np.isfinite(mo) and mo * HEADROOM > dtype_max:
        reasons.append(f"max |output| {mo:.3g} within {HEADROOM:g}x of {d}'s max {dtype_max:.4g}")
    if np.isfinite(mg) and mg * HEADROOM > dtype_max:
        reasons.append(f"max |gradient| x loss scale {mg:.3g} within {HEADROOM:g}x of {d}'s max {dtype_max:.4g}")
    if not overflow and out_e > out_tol:
        reasons.append(f"output error {out_e:.3g} > {out_tol:g}")
    if not overflow and grad_e > grad_tol:
        reasons.append(f"gradient error {grad_e:.3g} > {grad_tol:g}")
    return ModuleReport(module, d, out_e, grad_e, mo, mg, bool(overflow), bool(reasons), "; ".join(reasons) or "ok")


def _pick(tree, path):
    if path is None:
        return None
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _describe(r: ModuleReport) -> str:
    verdict = "fp32" if r.needs_fp32 else r.dtype
    return (f"{r.module:<18} {r.dtype}: output err {r.out_rel_err:.2e}, grad err {r.grad_rel_err:.2e}, "
            f"max|out| {r.max_abs_out:.3g}, max|grad|xS {r.max_scaled_grad:.3g} -> {verdict} ({r.why})")


def policy_document(mode: str, reports: list[ModuleReport]) -> dict:
    """The YAML `precision.policy_file` reads: mode, module -> dtype, and the measurements behind it."""
    mine = [r for r in reports if r.dtype == mode]
    return {
        "mode": mode,
        "modules": {r.module: "float32" if r.needs_fp32 else jnp.dtype(LOW_DTYPES[mode]).name for r in mine},
        "measurements": {r.module: {k: (v if not isinstance(v, float) or np.isfinite(v) else None)
                                    for k, v in asdict(r).items() if k not in ("module", "dtype")} for r in mine},
    }


def write_policy(path: str, mode: str, reports: list[ModuleReport]) -> None:
    text = "# written by `picotron-jax precision analyze`; train with precision.policy_file=" + path + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + yaml.safe_dump(policy_document(mode, reports), sort_keys=False))
