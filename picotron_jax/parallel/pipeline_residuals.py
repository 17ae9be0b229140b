"""A stage's backward state, kept from a microbatch's F slot to its B slot, without the stage's weights.

The pipeline's F slot runs the stage under `jax.vjp`; the pullback it returns is a pytree whose leaves are
the residuals autodiff saved (activations, attention probabilities, norms' statistics, ... or, under a remat
policy, only the layers' inputs) and, forwarded unchanged, the stage's weights. `StageResiduals` keeps the
other leaves in per-slot buffers of the scan's carry ([slots, ...] each, the slot being the microbatch's
input-buffer slot) and rebuilds the pullback in the B slot from those and the weights, read again from the
params. So 1F1B holds the activations of its <= p in-flight microbatches, AFAB those of all m, and neither
recomputes the stage's forward unless a remat policy says so; no buffer holds a copy of the weights.

Weights are recognised by identity: the pullback's leaves that *are* the (already cast) parameter arrays it
was given. The stage program casts the parameters before the vjp, so its own casts are no-ops and the
weights reach the pullback as they are.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from picotron_jax.compat import vary as _vary, varying_axes


class StageResiduals:
    """The residual layout of one stage function (the same for every slot: one traced program).

    `forward(params, x, stage) -> (outputs, aux)`: differentiated in `params` and `x`; `aux` is not, nor
    `stage` (the global stage index, traced). `out_types`: each output's (shape, dtype, varying axes), the
    types their cotangents must have. Saved leaves are kept as varying over (at least) `axes`, the pipeline's
    activation axes: a leaf that varies over fewer in one trace (a constant under a `lax.switch` over stages)
    then has the same type in every trace."""

    def __init__(self, forward: Callable, axes: tuple[str, ...]):
        self.forward, self.axes = forward, axes
        self.treedef: Any = None  # the pullback's pytree structure (from the latest F trace)
        self.sources: list[int | None] = []  # per pullback leaf: the index of the param leaf it is, or None (saved)
        self.saved_types: list[tuple[tuple[int, ...], Any, tuple[str, ...]]] = []  # shape, dtype, varying axes
        self.out_types: Any = None  # the outputs' (shape, dtype, varying axes): their cotangents' types

    def _split(self, params: Any, x: jax.Array, stage: jax.Array):
        outputs, pullback, aux = jax.vjp(lambda p, x: self.forward(p, x, stage), params, x, has_aux=True)
        leaves, treedef = jax.tree.flatten(pullback)
        param_index = {id(leaf): j for j, leaf in enumerate(jax.tree.leaves(params))}
        sources = [param_index.get(id(leaf)) for leaf in leaves]
        saved = [leaf for leaf, src in zip(leaves, sources) if src is None]
        return outputs, aux, treedef, sources, saved

    def buffers(self, params: Any, x: jax.Array, stage: jax.Array, slots: int) -> list[jax.Array]:
        """Zero buffers [slots, ...] for the saved leaves, typed like them (traced abstractly, nothing runs)."""
        record = {}

        def trace():
            outputs, _, treedef, sources, saved = self._split(params, x, stage)
            record.update(sources=sources,
                          types=[(a.shape, a.dtype, tuple(sorted(varying_axes(a) | set(self.axes)))) for a in saved],
                          out=jax.tree.map(lambda a: (a.shape, a.dtype, tuple(sorted(varying_axes(a)))), outputs))
            return saved

        jax.eval_shape(trace)
        self.sources, self.saved_types, self.out_types = record["sources"], record["types"], record["out"]
        return [_vary(jnp.zeros((slots, *shape), dtype), vma) for shape, dtype, vma in self.saved_types]

    def save(self, buffers: list[jax.Array], slot: jax.Array, params: Any, x: jax.Array, stage: jax.Array):
        """F: run the stage; -> (outputs, aux, buffers with this microbatch's residuals at `slot`)."""
        outputs, aux, treedef, sources, saved = self._split(params, x, stage)
        if sources != self.sources:  # the same function on the same types: one layout
            raise AssertionError("the stage's residual layout changed between traces")
        self.treedef = treedef
        return outputs, aux, [b.at[slot].set(_vary(a, t[2])) for b, a, t in zip(buffers, saved, self.saved_types)]

    def pullback(self, buffers: list[jax.Array], slot: jax.Array, params: Any) -> Callable:
        """B: the F slot's pullback, from the residuals at `slot` and the (same) params."""
        param_leaves, saved = jax.tree.leaves(params), iter(b[slot] for b in buffers)
        leaves = [next(saved) if src is None else param_leaves[src] for src in self.sources]
        return jax.tree.unflatten(self.treedef, leaves)
