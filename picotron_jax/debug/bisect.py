"""Layout bisect: `picotron-jax debug bisect --config A.yaml --against B.yaml` runs one step's forward and
backward on two layouts from one initialisation and one batch, and names the first value, layer by layer
and forward before backward, whose difference exceeds the tolerance.

Every layout must compute the same math (DESIGN.md: same math on every layout); a missing reduction or
a wrong partition spec inside a `shard_map` breaks that, and the first layer output that differs is
where to look. The values come out of one jitted program per layout through the model's layer hook
(`layer_tap`): each decoder layer's output x_BTD passes through `probe(x, p, q) = x + p` with p = q = 0,
whose custom backward hands back the incoming gradient as p's cotangent and the forward activation
x as q's. So d(loss)/dp[l] is the gradient reaching layer l's output (backward) and d(loss)/dq[l] is
layer l's output (forward), with the layout's own shardings and no host callbacks.

When the layouts differ in more than one mesh axis and they diverge, layout A is run again with each
one of B's axis sizes alone (e.g. data=4, then tensor=2), naming the axes whose split alone reproduces
the divergence.

Order of comparison: forward, the outputs of layers 0 .. L-1, then the loss; backward, the gradients at
the outputs of layers L-1 .. 0, then the parameter gradients (stacked layer weights from the last layer
to the first, then the rest). A difference is max |a - b| / max(max |a|, tiny) (relative to layout A).
Pipeline layouts (mesh.pipe > 1) run another program and are not compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from picotron_jax.errors import UserError

SAME = (("model", None), ("moe", None), ("train", "seq_len"), ("train", "global_batch"), ("train", "seed"),
        ("train", "z_loss"), ("data", None), ("precision", None))  # what both configs must agree on


@jax.custom_vjp
def probe(x_BTD, p_BTD, q_BTD):
    return x_BTD + p_BTD.astype(x_BTD.dtype)


def _probe_fwd(x_BTD, p_BTD, q_BTD):
    return x_BTD + p_BTD.astype(x_BTD.dtype), x_BTD


def _probe_bwd(x_BTD, g_BTD):
    return g_BTD, g_BTD.astype(jnp.float32), x_BTD.astype(jnp.float32)


probe.defvjp(_probe_fwd, _probe_bwd)


@dataclass
class Divergence:
    what: str  # "forward: decoder layer 0 output", "backward: gradient of params.layers.w_down, layer 1", ...
    relative: float
    max_abs: float
    index: tuple  # where |a - b| is largest
    differing: int  # elements over the tolerance
    size: int
    tolerance: float
    axes: list[tuple[str, int, bool | None]] = field(default_factory=list)  # (mesh axis, B's size, diverges alone?)

    def describe(self) -> str:
        text = (f"first divergence: {self.what}: max |difference| {self.max_abs:.4g} (relative {self.relative:.3g} > "
                f"tolerance {self.tolerance:g}) at index {list(self.index)}; {self.differing} of {self.size} elements "
                f"differ")
        if len(self.axes) > 1:
            verdict = {True: "diverges", False: "agrees", None: "not a valid layout"}
            text += "\n  layout A with one mesh axis of layout B: " + "; ".join(
                f"mesh.{axis} = {size}: {verdict[bad]}" for axis, size, bad in self.axes)
        return text


def _check_same_model(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    for section, key in SAME:
        va, vb = (da[section], db[section]) if key is None else (da[section][key], db[section][key])
        if va != vb:
            diff = next((f"{section}.{k}" for k in va if va[k] != vb.get(k)), section) if key is None else \
                f"{section}.{key}"
            raise UserError(f"config field '{diff}' differs between the two configs: a layout bisect compares two "
                            f"layouts of one model on one batch; make it equal (only mesh and layout fields may "
                            f"differ)")
    for cfg in (a, b):
        if cfg.mesh.pipe != 1:
            raise UserError(f"config field 'mesh.pipe' = {cfg.mesh.pipe}: the layout bisect compares layouts without "
                            f"pipeline stages (mesh.pipe = 1)")


def layer_values(cfg, params_host, batch_host) -> dict:
    """One step's probed values on `cfg`'s layout: loss, acts / grads_at [L, B, T, D] in natural sequence
    order, and the parameter gradients (host arrays)."""
    from picotron_jax.run import build_run
    from picotron_jax.train.step import make_loss_sums

    run = build_run(cfg, data=False)
    rules, setup = run.rules, run.setup
    loss_sums = make_loss_sums(cfg, rules, setup.spec.graphdef, setup.policy)
    B, T, D, L = cfg.train.global_batch, cfg.train.seq_len, cfg.model.hidden_size, cfg.model.num_layers

    def objective(params, batch, p_LBTD, q_LBTD):
        def tap(x_BTD, layer):
            return probe(x_BTD, p_LBTD[layer], q_LBTD[layer])

        return loss_sums(params, batch, None, tap)[0]

    zeros = NamedSharding(rules.mesh, P(None, *rules.activation_spec(("batch", "seq", "embed"))))
    params = jax.device_put(params_host, setup.shardings.params)
    batch = {k: jax.device_put(v, rules.batch_sharding()) for k, v in batch_host.items()}
    p = jax.device_put(np.zeros((L, B, T, D), np.float32), zeros)
    loss, (g_params, g_p, g_q) = jax.jit(jax.value_and_grad(objective, argnums=(0, 2, 3)))(params, batch, p, p)
    inverse = np.argsort(rules.sequence_order(T))  # the layer outputs are in the context layout's column order
    return {"loss": np.asarray(loss), "acts": np.asarray(g_q)[:, :, inverse], "grads_at": np.asarray(g_p)[:, :, inverse],
            "params": jax.device_get(g_params)}


def _compare(what: str, a, b, tolerance: float) -> Divergence | None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    diff = np.where(np.isnan(a) != np.isnan(b), np.inf, np.nan_to_num(diff, nan=0.0))
    scale = max(float(np.max(np.abs(np.nan_to_num(a)))) if a.size else 0.0, 1e-30)
    worst = float(diff.max()) if diff.size else 0.0
    if worst / scale <= tolerance:
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    return Divergence(what, worst / scale, worst, index, int((diff / scale > tolerance).sum()), a.size, tolerance)


def ordered_values(v: dict, num_layers: int):
    """(description, value) in the bisect's order: forward before backward, layer by layer."""
    for layer in range(num_layers):
        yield f"forward: decoder layer {layer} output", v["acts"][layer]
    yield "forward: loss", v["loss"]
    for layer in reversed(range(num_layers)):
        yield f"backward: gradient at decoder layer {layer}'s output", v["grads_at"][layer]
    flat = {jax.tree_util.keystr(k, simple=True, separator="."): x
            for k, x in jax.tree_util.tree_flatten_with_path(v["params"])[0]}
    stacked = sorted(n for n in flat if n.startswith("layers."))
    for layer in reversed(range(num_layers)):
        for name in stacked:
            yield f"backward: gradient of params.{name}, layer {layer}", flat[name][layer]
    for name in sorted(n for n in flat if not n.startswith("layers.")):
        yield f"backward: gradient of params.{name}", flat[name]


def first_divergence(values_a: dict, values_b: dict, num_layers: int, tolerance: float) -> Divergence | None:
    for (what, a), (_, b) in zip(ordered_values(values_a, num_layers), ordered_values(values_b, num_layers)):
        if (found := _compare(what, a, b, tolerance)) is not None:
            return found
    return None


def mesh_sizes(cfg) -> dict[str, int]:
    from picotron_jax.config import MESH_AXES, resolve_mesh_shape
    from picotron_jax.mesh import run_devices

    sizes = resolve_mesh_shape(cfg.mesh, len(run_devices(cfg.mesh)))
    return {axis: int(sizes[axis]) for axis in MESH_AXES}


def blame_axes(cfg_a, cfg_b, values_a: dict, params, batch, tolerance: float, say=print) -> list:
    """Where layouts A and B differ in more than one mesh axis: A with each one of B's axis sizes, compared
    with A ((axis, size, diverges), diverges None where that layout is not valid)."""
    sizes_a, sizes_b = mesh_sizes(cfg_a), mesh_sizes(cfg_b)
    differing = [axis for axis in sizes_a if sizes_a[axis] != sizes_b[axis]]
    if len(differing) < 2:
        return [(axis, sizes_b[axis], True) for axis in differing]
    out = []
    for axis in differing:
        sizes = {**sizes_a, axis: sizes_b[axis]}
        try:
            cfg = cfg_a.replace(mesh={**sizes, "num_devices": math.prod(sizes.values())})
            say(f"layout A with mesh.{axis} = {sizes_b[axis]}")
            values = layer_values(cfg, params, batch)
        except UserError:
            out.append((axis, sizes_b[axis], None))
            continue
        found = first_divergence(values_a, values, cfg_a.model.num_layers, tolerance)
        out.append((axis, sizes_b[axis], found is not None))
    return out


def bisect(cfg_a, cfg_b, tolerance: float = 1e-4, say=print, blame: bool = True) -> Divergence | None:
    """The first value whose difference between layouts A and B exceeds `tolerance`; None if none does."""
    from picotron_jax.run import build_run
    from picotron_jax.train.state import init_params

    _check_same_model(cfg_a, cfg_b)
    run_a = build_run(cfg_a)
    params = jax.device_get(init_params(cfg_a, run_a.setup))  # one initialisation for both layouts
    batch = jax.device_get(run_a.batch(0))
    values = []
    for name, cfg in (("A", cfg_a), ("B", cfg_b)):
        m = cfg.mesh
        say(f"layout {name}: pipe={m.pipe} data={m.data} context={m.context} expert={m.expert} tensor={m.tensor}")
        values.append(layer_values(cfg, params, batch))
    found = first_divergence(values[0], values[1], cfg_a.model.num_layers, tolerance)
    if found is not None and blame:
        found.axes = blame_axes(cfg_a, cfg_b, values[0], params, batch, tolerance, say)
    return found
