"""MAML, first-order MAML, Reptile and Meta-SGD over any `loss_fn(params, batch) -> scalar`.

The inner loop is `inner_steps` SGD steps on a task's support batch, a `lax.scan` whose body is under
`jax.checkpoint` (remat): its activations are recomputed in the backward pass, so only the carried
parameters of each inner step are kept (the JAX take on learn2learn's MAML, where memory grows with every
inner step's activations). The meta-objective is the query loss after adaptation:

    maml     (Finn et al. 2017): grad_theta L_query(theta - a grad L_support(theta) ...), second order: the
             nested jax.grad differentiates through the inner gradients (Hessian-vector products)
    fomaml   the same with the inner gradients under stop_gradient: grad = grad L_query(theta')
    metasgd  (Li et al. 2017): maml with a learned inner learning rate per parameter element, `lrs`, a pytree
             shaped (and sharded) like the parameters, meta-learned with them
    reptile  (Nichol et al. 2018): no query loss; the meta "gradient" is theta - theta' (adapted on the
             task's support and query data), so an outer SGD step of size e moves e of the way to theta'

Meta-parameters are `{"params": theta}` (and `"lrs"` for metasgd). Tasks come batched: every leaf of
`tasks` has a leading task axis; they are vmapped, and the meta-gradient is the mean over tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")
LossFn = Callable[[Any, Any], jax.Array]


def sgd_step(loss_fn: LossFn, theta: Any, batch: Any, lrs: Any, first_order: bool) -> Any:
    """theta - lrs * grad loss_fn(theta, batch); `lrs` a scalar or a pytree like theta. First order: the
    gradient is taken at stop_gradient(theta), so no derivative is traced through the inner backward pass
    (stopping only its result left the outer differentiation to linearise it and throw it away: 5x slower
    on the corpus Llama)."""
    g = jax.grad(loss_fn)(jax.lax.stop_gradient(theta) if first_order else theta, batch)
    if isinstance(lrs, (int, float)) or (hasattr(lrs, "ndim") and lrs.ndim == 0):
        return jax.tree.map(lambda p, gp: p - lrs * gp, theta, g)
    return jax.tree.map(lambda p, gp, a: p - a * gp, theta, g, lrs)


def adapt(loss_fn: LossFn, theta: Any, support: Any, lrs: Any, steps: int, first_order: bool = False,
          remat: bool = True) -> Any:
    """theta after `steps` inner SGD steps on `support` (scanned; the body rematerialised when `remat`)."""
    if steps == 0:
        return theta

    def body(carry, _):
        return sgd_step(loss_fn, carry, support, lrs, first_order), None

    if remat:
        body = jax.checkpoint(body)
    theta, _ = jax.lax.scan(body, theta, None, length=steps)
    return theta


def adaptation_curve(loss_fn: LossFn, theta: Any, support: Any, query: Any, lrs: Any, steps: int) -> jax.Array:
    """Query loss after 0, 1, ..., `steps` inner steps on the support batch: [steps + 1]."""

    def body(carry, _):
        carry = sgd_step(loss_fn, carry, support, lrs, True)
        return carry, loss_fn(carry, query)

    _, losses = jax.lax.scan(body, theta, None, length=steps)
    return jnp.concatenate([loss_fn(theta, query)[None], losses])


@dataclass(frozen=True)
class MetaLearner:
    """One meta-learning algorithm over a loss function; `meta_grad` is what the jitted meta-step differentiates."""

    loss_fn: LossFn
    algorithm: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    remat: bool = True
    spmd_axis: str | None = None  # the mesh axis of the task axis inside the loss's sharding constraints

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown meta-learning algorithm {self.algorithm!r}; one of {ALGORITHMS}")

    def init(self, params: Any) -> dict:
        """Meta-parameters from model parameters (Meta-SGD: inner learning rates start at inner_lr)."""
        meta = {"params": params}
        if self.algorithm == "metasgd":
            meta["lrs"] = jax.tree.map(lambda p: jnp.full(p.shape, self.inner_lr, p.dtype), params)
        return meta

    def inner_lrs(self, meta: dict) -> Any:
        return meta["lrs"] if self.algorithm == "metasgd" else self.inner_lr

    def adapted(self, meta: dict, support: Any) -> Any:
        """The task's adapted parameters theta'."""
        return adapt(self.loss_fn, meta["params"], support, self.inner_lrs(meta), self.inner_steps,
                     first_order=self.algorithm == "fomaml", remat=self.remat)

    def task_objective(self, meta: dict, task: dict) -> jax.Array:
        """Query loss after adapting on the support set (maml, fomaml, metasgd)."""
        return self.loss_fn(self.adapted(meta, task["support"]), task["query"])

    def task_grad(self, meta: dict, task: dict) -> tuple[jax.Array, dict]:
        """(query loss after adaptation, meta-gradient) of one task."""
        if self.algorithm != "reptile":
            return jax.value_and_grad(self.task_objective)(meta, task)
        both = jax.tree.map(lambda s, q: jnp.concatenate([s, q]), task["support"], task["query"])
        theta = jax.lax.stop_gradient(adapt(self.loss_fn, meta["params"], both, self.inner_lr, self.inner_steps,
                                            first_order=True, remat=self.remat))
        loss = self.loss_fn(theta, task["query"])
        return loss, {"params": jax.tree.map(lambda p, q: p - q, meta["params"], theta)}

    def meta_grad(self, meta: dict, tasks: dict) -> tuple[jax.Array, dict]:
        """(mean post-adaptation query loss, mean meta-gradient) over a batch of tasks (leading axis)."""
        losses, grads = jax.vmap(self.task_grad, in_axes=(None, 0), spmd_axis_name=self.spmd_axis)(meta, tasks)
        return losses.mean(), jax.tree.map(lambda g: g.mean(axis=0), grads)
