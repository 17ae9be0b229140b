"""The one place that touches JAX APIs which are not stable public API (renamed before, may be again).

Every use goes through a function here that checks the API is what this code expects and raises
`CompatError` naming the API and the installed version when it is not, instead of silently doing
something else. tests/test_engine_review.py calls each function, so an upgrade that breaks one fails
the suite loudly.
"""

from __future__ import annotations

import importlib

import jax


class CompatError(RuntimeError):
    """An API this code depends on is missing or changed in the installed JAX."""


def _fail(api: str, why: str) -> CompatError:
    return CompatError(f"{api}: {why} (jax {jax.__version__}); picotron_jax/compat.py needs updating for this "
                       f"version (see pyproject.toml for the versions it is tested with)")


def _private(module: str, name: str):
    """`jax._src.<module>.<name>`, or a CompatError naming it when the module or the name has gone."""
    try:
        found = getattr(importlib.import_module(f"jax._src.{module}"), name, None)
    except ImportError as e:
        raise _fail(f"jax._src.{module}", f"cannot import it ({e})") from None
    if found is None:
        raise _fail(f"jax._src.{module}.{name}", "missing")
    return found


def varying_axes(x) -> frozenset[str]:
    """The mesh axes `x` varies over inside `shard_map` (empty outside): `jax.typeof(x).mat.varying`,
    shard_map's varying-manual-axes type (renamed once already)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        raise _fail("jax.typeof", "missing")
    aval = typeof(x)
    mat = getattr(aval, "mat", None)
    varying = getattr(mat, "varying", None) if mat is not None else None
    if varying is None:
        raise _fail("jax.typeof(x).mat.varying", f"{type(aval).__name__} has no mat.varying")
    return frozenset(varying)


def vary(x, axes) -> jax.Array:
    """x typed as varying over `axes` too (shard_map's type system; `jax.lax.pcast` of the axes it does not
    vary over yet)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def distributed_state():
    """JAX's multi-process state after `jax.distributed.initialize()`: `jax._src.distributed.global_state`,
    whose `client` is the coordination service (key-value store, barriers) and `process_id`,
    `num_processes`, `coordinator_address` what it was started with. JAX has no public API for these."""
    state = _private("distributed", "global_state")
    missing = [a for a in ("client", "process_id", "num_processes", "coordinator_address") if not hasattr(state, a)]
    if missing:
        raise _fail("jax._src.distributed.global_state", f"missing {', '.join(missing)}")
    return state


def distributed_client():
    """The coordination service client (`key_value_set`, `blocking_key_value_get`, `wait_at_barrier`);
    raises when a multi-process run has none (jax.distributed was not initialised)."""
    client = distributed_state().client
    if client is None:
        raise _fail("jax._src.distributed.global_state.client", "None: jax.distributed.initialize() has not run")
    for method in ("key_value_set", "blocking_key_value_get", "wait_at_barrier"):
        if not hasattr(client, method):
            raise _fail(f"jax._src.distributed.global_state.client.{method}", "missing")
    return client


def backends_are_initialized() -> bool:
    """Whether JAX's backends have started (allocator settings read from the environment are fixed then):
    `jax._src.xla_bridge.backends_are_initialized()`."""
    return bool(_private("xla_bridge", "backends_are_initialized")())


def user_frame(traceback):
    """The innermost frame of user code (not JAX's) in a jaxpr equation's traceback, or None:
    `jax._src.source_info_util.user_frame` (file_name, start_line)."""
    return _private("source_info_util", "user_frame")(traceback)
