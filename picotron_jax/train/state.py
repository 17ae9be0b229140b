"""The train state (step, parameters, optimizer state) and its shardings on the mesh.

Parameters are created inside `jit` with the target shardings as `out_shardings`: each device
builds only its shard, and with JAX's partitionable threefry the values depend on the seed
alone, never on the mesh (DESIGN: same math on every layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from picotron_jax.config import Config
from picotron_jax.models.llama import Llama
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train import precision as mp
from picotron_jax.train.optimizer import build_optimizer
from picotron_jax.train.spike_guard import init_spike_state
from picotron_jax.train.spike_guard import wanted as spike_wanted


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nested dict of arrays (nnx pure dict)
    opt_state: Any
    loss_scale: Any = None  # fp16: train/precision.py LossScaleState (scale, skipped steps, overflows); else None
    spike: Any = None  # monitor.on_spike=skip: train/spike_guard.py SpikeState (robust windows); else None


@dataclass
class ModelSpec:
    """What the step needs to know about the model without holding its values."""

    graphdef: Any
    logical_axes: Any  # same tree as params, leaves = tuples of logical names
    shapes: Any  # same tree as params, leaves = jax.ShapeDtypeStruct

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in jax.tree.leaves(self.shapes))


def model_spec(cfg: Config) -> ModelSpec:
    abstract = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(cfg.train.seed), moe=cfg.moe))
    graphdef, state = nnx.split(abstract)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    axes = jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), state, is_leaf=is_var)
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state, is_leaf=is_var)
    return ModelSpec(graphdef, nnx.to_pure_dict(axes), nnx.to_pure_dict(shapes))


@dataclass
class StateSetup:
    """Everything about the train state that does not hold array values."""

    spec: ModelSpec
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState  # a TrainState whose leaves are NamedShardings
    abstract: TrainState  # a TrainState whose leaves are ShapeDtypeStructs
    policy: mp.PrecisionPolicy | None = None  # dtypes per module; None -> resolved from the config


def setup_state(cfg: Config, rules: MeshRules, promoted: tuple[str, ...] = ()) -> StateSetup:
    """`promoted`: modules moved to fp32 after repeated fp16 overflow (train/precision.py)."""
    spec = model_spec(cfg)
    tx, schedule = build_optimizer(cfg)
    param_shardings = rules.param_shardings(spec.logical_axes, spec.shapes)
    abstract_opt = jax.eval_shape(tx.init, spec.shapes)
    opt_shardings = rules.opt_state_shardings(tx, abstract_opt, spec.logical_axes, spec.shapes)
    replicated = rules.named(jax.sharding.PartitionSpec())
    policy = mp.resolve_policy(cfg, list(rules.mesh.devices.flat), promoted)
    abstract_scale = jax.eval_shape(lambda: mp.init_loss_scale(cfg)) if policy.loss_scaling else None
    abstract_spike = jax.eval_shape(lambda: init_spike_state(cfg.monitor.window)) if spike_wanted(cfg) else None
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                           loss_scale=jax.tree.map(lambda _: replicated, abstract_scale),
                           spike=jax.tree.map(lambda _: replicated, abstract_spike))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=spec.shapes, opt_state=abstract_opt,
                          loss_scale=abstract_scale, spike=abstract_spike)
    return StateSetup(spec, tx, schedule, shardings, abstract, policy)


def init_params(cfg: Config, setup: StateSetup) -> Any:
    def create():
        return nnx.to_pure_dict(nnx.split(Llama(cfg.model, rngs=nnx.Rngs(cfg.train.seed), moe=cfg.moe))[1])

    return jax.jit(create, out_shardings=setup.shardings.params)()


def init_train_state(cfg: Config, setup: StateSetup) -> TrainState:
    return state_from_params(cfg, setup, init_params(cfg, setup))


def state_from_params(cfg: Config, setup: StateSetup, params: Any) -> TrainState:
    """A fresh train state (step 0, a new optimizer state) around `params` laid out by setup.shardings.params."""

    def create(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.tx.init(params),
                          loss_scale=mp.init_loss_scale(cfg) if setup.abstract.loss_scale is not None else None,
                          spike=init_spike_state(cfg.monitor.window) if setup.abstract.spike is not None else None)

    return jax.jit(create, out_shardings=setup.shardings)(params)
