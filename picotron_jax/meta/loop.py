"""Meta-training on the mesh (`picotron-jax meta`, `run_meta`): one jitted meta-step, adaptation curves.

The meta-step is one program: the task batch is split over `data`, the model's arrays are laid out by
the task family's `param_specs` (the MLP's hidden units or the Llama's heads / MLP / vocabulary over `tensor`,
with train.zero_stage=3 over `data` too; Meta-SGD's learned
rates exactly like the parameters), the tasks are vmapped, the inner loop scanned under remat, and Adam
updates the meta-parameters in place (donated).

The task kind (`meta.task`) is a TaskFamily (tasks.py): its task sampler, model init, loss and parameter
specs; the loop itself is the same for sinusoids (sine.py's MLP) and corpus documents (corpus_tasks.py's Llama).

Evaluation: on `meta.eval_tasks` held-out tasks (tasks the training never draws), the query loss after
0 .. meta.eval_steps inner SGD steps, for the meta-learned initialisation and for a conventionally trained
one: the same model trained with Adam on the pooled support and query data of the same task batches, for
as many gradient evaluations as the meta-training spent (meta.steps x (meta.inner_steps + 1)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from picotron_jax.config import Config, META_TASKS, resolve_mesh_shape
from picotron_jax.errors import UserError
from picotron_jax.mesh import build_mesh, run_devices
from picotron_jax.meta.algorithms import ALGORITHMS, MetaLearner, adaptation_curve
from picotron_jax.meta.tasks import TaskFamily, task_family


def check_meta(cfg: Config, num_devices: int) -> dict[str, int]:
    """The `meta` section against the mesh; one UserError naming the field."""
    m = cfg.meta

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise UserError(message)

    need(m.task in META_TASKS, f"config field 'meta.task' = {m.task!r}: valid values are {', '.join(META_TASKS)}")
    need(m.algorithm in ALGORITHMS,
         f"config field 'meta.algorithm' = {m.algorithm!r}: valid values are {', '.join(ALGORITHMS)}")
    for name in ("inner_steps", "steps", "tasks_per_step", "k_support", "k_query", "hidden", "eval_tasks",
                 "log_every"):
        need(getattr(m, name) >= 1, f"config field 'meta.{name}' = {getattr(m, name)}: must be >= 1")
    need(m.eval_steps >= 0, f"config field 'meta.eval_steps' = {m.eval_steps}: must be >= 0")
    need(m.inner_lr > 0 and m.outer_lr > 0,
         f"config fields 'meta.inner_lr' = {m.inner_lr}, 'meta.outer_lr' = {m.outer_lr}: must be positive")
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    need(sizes["pipe"] == sizes["context"] == sizes["expert"] == 1,
         f"config field 'mesh' = {sizes}: meta-learning splits tasks over mesh.data and the model over mesh.tensor; "
         f"set mesh.pipe, mesh.context and mesh.expert to 1")
    need(m.tasks_per_step % sizes["data"] == 0 and m.eval_tasks % sizes["data"] == 0,
         f"config field 'meta.tasks_per_step' = {m.tasks_per_step} (and meta.eval_tasks = {m.eval_tasks}): must be "
         f"divisible by mesh.data = {sizes['data']}")
    return sizes


@dataclass
class MetaSetup:
    """What a meta run builds: mesh, learner, shardings and the jitted meta-step."""

    cfg: Config
    mesh: Any
    learner: MetaLearner
    meta_shardings: dict
    task_sharding: NamedSharding
    optimizer: Any
    family: TaskFamily

    def tasks(self, index: int, count: int | None = None, held_out: bool = False) -> dict:
        """Task batch `index` (of the held-out tasks with `held_out`), placed with the task axis over `data`."""
        host = self.family.sample_tasks(index, count or self.cfg.meta.tasks_per_step, held_out)
        return jax.tree.map(lambda x: jax.device_put(x, self.task_sharding), host)

    def init(self) -> tuple[dict, Any]:
        """Meta-parameters and Adam state, laid out on the mesh."""
        meta = jax.device_put(self.learner.init(self.family.init()), self.meta_shardings)
        return meta, jax.jit(self.optimizer.init, out_shardings=self.opt_shardings())(meta)

    def opt_shardings(self, shardings: Any = None) -> Any:
        """Adam's moments laid out like the meta-parameters (or `shardings`), its count replicated: the state
        a step returns is laid out as the state it was given, so the step compiles once, not again on its
        second call."""
        shardings = self.meta_shardings if shardings is None else shardings
        abstract = jax.eval_shape(self.optimizer.init, jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((), jnp.float32), shardings))
        return optax.tree_map_params(self.optimizer, lambda _, sharding: sharding, abstract, shardings,
                                     transform_non_params=lambda _: NamedSharding(self.mesh, P()),
                                     is_leaf=lambda x: isinstance(x, NamedSharding))

    def step_fn(self) -> Callable:
        """Jitted (meta, opt_state, tasks) -> (meta, opt_state, mean query loss); meta and state donated."""
        learner, opt = self.learner, self.optimizer

        def step(meta, opt_state, tasks):
            loss, grads = learner.meta_grad(meta, tasks)
            updates, opt_state = opt.update(grads, opt_state, meta)
            return optax.apply_updates(meta, updates), opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1), out_shardings=(self.meta_shardings, self.opt_shardings(), None))


def build_meta(cfg: Config, devices: list | None = None) -> MetaSetup:
    devices = run_devices(cfg.mesh) if devices is None else devices
    sizes = check_meta(cfg, len(devices))
    mesh = build_mesh(cfg.mesh, devices)
    m = cfg.meta
    family = task_family(cfg, mesh, sizes)
    learner = MetaLearner(family.loss, m.algorithm, m.inner_steps, m.inner_lr, m.remat, family.spmd_axis)
    specs = family.param_specs()
    meta_specs = {"params": specs, **({"lrs": specs} if m.algorithm == "metasgd" else {})}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), meta_specs, is_leaf=lambda x: isinstance(x, P))
    return MetaSetup(cfg, mesh, learner, shardings, NamedSharding(mesh, P("data")), optax.adam(m.outer_lr), family)


def curves(setup: MetaSetup, params: Any, lrs: Any, steps: int) -> list[float]:
    """Mean held-out query loss after 0 .. steps inner SGD steps (rates `lrs`) from `params`."""
    losses = _curves(setup.family, params, lrs, setup.tasks(0, setup.cfg.meta.eval_tasks, held_out=True), steps)
    return [float(x) for x in np.asarray(losses).mean(axis=0)]


@partial(jax.jit, static_argnums=(0, 4))
def _curves(family: TaskFamily, params: Any, lrs: Any, tasks: dict, steps: int) -> jax.Array:
    """[tasks, steps + 1] query losses (one compile serves the meta-learned and the baseline initialisation)."""
    return jax.vmap(lambda t: adaptation_curve(family.loss, params, t["support"], t["query"], lrs, steps),
                    spmd_axis_name=family.spmd_axis)(tasks)


def pretrain_baseline(setup: MetaSetup, gradient_evals: int,
                      on_step: Callable[[int, Any], None] | None = None) -> Any:
    """The conventional initialisation: Adam on the pooled support and query data of the training task batches
    (the mean over the batch's tasks of each task's loss on its support + query data). `on_step(i, params)`,
    if given, sees the parameters after each gradient evaluation i = 1 .. gradient_evals (before the next
    step donates them): benchmarks/meta_curves.py evaluates the baseline on the way."""
    m, family = setup.cfg.meta, setup.family
    params = jax.device_put(family.init(), setup.meta_shardings["params"])
    opt = optax.adam(m.outer_lr)

    def step(params, opt_state, tasks):  # per-task gradients vmapped (as the meta-step's), then their mean
        pooled = jax.tree.map(lambda s, q: jnp.concatenate([s, q], axis=1), tasks["support"], tasks["query"])
        grads_N = jax.vmap(jax.grad(family.loss), in_axes=(None, 0), spmd_axis_name=family.spmd_axis)(params, pooled)
        grads = jax.tree.map(lambda g: g.mean(axis=0), grads_N)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_shardings = setup.opt_shardings(setup.meta_shardings["params"])
    step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(setup.meta_shardings["params"], opt_shardings))
    opt_state = jax.jit(opt.init, out_shardings=opt_shardings)(params)
    for i in range(gradient_evals):  # one step in flight at a time (see run_meta)
        params, opt_state = jax.block_until_ready(step(params, opt_state, setup.tasks(i % m.steps)))
        if on_step is not None:
            on_step(i + 1, params)
    return params


def run_meta(cfg: Config, run_dir: str | Path | None = None, say: Callable[[str], None] = print) -> dict:
    """Meta-train, then compare adaptation curves with the baseline; writes RUN_DIR/adaptation.json and
    metrics.jsonl. Returns {"meta": [...], "baseline": [...], "losses": [(step, meta-loss), ...]}."""
    setup = build_meta(cfg)
    m = cfg.meta
    say(f"meta-learning: {m.algorithm}, {m.inner_steps} inner step(s) at lr {m.inner_lr}, {m.tasks_per_step} "
        f"tasks/step on mesh {dict(setup.mesh.shape)}")
    meta, opt_state = setup.init()
    step = setup.step_fn()
    losses = []
    for i in range(m.steps):  # one step in flight at a time: on XLA:CPU many programs in flight can deadlock in
        # their collectives (train/evaluate.py; seen here: the corpus baseline's all-reduce on data=2, a loaded host)
        meta, opt_state, loss = jax.block_until_ready(step(meta, opt_state, setup.tasks(i)))
        if (i + 1) % m.log_every == 0 or i + 1 == m.steps:
            losses.append((i + 1, float(loss)))
            say(f"meta step {i + 1}/{m.steps} | post-adaptation query loss {float(loss):.4f}")
    baseline = pretrain_baseline(setup, m.steps * (m.inner_steps + 1))
    result = {"meta": curves(setup, meta["params"], setup.learner.inner_lrs(meta), m.eval_steps),
              "baseline": curves(setup, baseline, m.inner_lr, m.eval_steps)}
    say(adaptation_table(result))
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "adaptation.json").write_text(json.dumps(result, indent=1))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "meta_loss": v}) + "\n"
                                                       for s, v in losses))
    return {**result, "losses": losses}


def adaptation_table(result: dict) -> str:
    """The k-shot adaptation table: held-out query loss after k inner steps, meta vs baseline."""
    lines = ["inner steps | meta-learned | pre-trained", "----------- | ------------ | -----------"]
    for k, (a, b) in enumerate(zip(result["meta"], result["baseline"])):
        lines.append(f"{k:>11} | {a:>12.4f} | {b:>11.4f}")
    return "\n".join(lines)
