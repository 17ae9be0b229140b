"""The one place that touches JAX APIs which are not stable public API (renamed before, may be again).

Every use goes through a function here that checks the API is what this code expects and raises
`CompatError` naming the API and the installed version when it is not, instead of silently doing
something else. tests/test_engine_review.py calls each function, so an upgrade that breaks one fails
the suite loudly.
"""

from __future__ import annotations

import jax


class CompatError(RuntimeError):
    """An API this code depends on is missing or changed in the installed JAX."""


def _fail(api: str, why: str) -> CompatError:
    return CompatError(f"{api}: {why} (jax {jax.__version__}); picotron_jax/compat.py needs updating for this "
                       f"version (see pyproject.toml for the versions it is tested with)")


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
