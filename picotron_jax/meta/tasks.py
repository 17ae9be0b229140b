"""The task interface of the meta loop: what a task kind (`meta.task`) provides, and the sinusoid kind.

A `TaskFamily` is everything the loop (loop.py) knows about a task kind:

    sample_tasks(index, count, held_out)  task batch `index` on the host: {"support": ..., "query": ...}, every
                                          leaf with a leading task axis; a pure function of (seed, index);
                                          held_out=True draws from tasks training never sees
    init()                                the model's initial parameters (a pytree of arrays)
    loss(params, batch)                   the scalar loss of one task's batch (what the inner loop descends)
    param_specs()                         the parameters' PartitionSpecs on the mesh
    spmd_axis                             the mesh axis the task axis is vmapped over inside the model's
                                          sharding constraints (vmap's spmd_axis_name), or None for a model
                                          without constraints

Two kinds: `sine` (here: sinusoid regression with an MLP, sine.py) and `corpus` (corpus_tasks.py: few-shot
next-token prediction on one source document of the corpus, with the project's Llama).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from picotron_jax.config import Config
from picotron_jax.meta import sine

EVAL_OFFSET = 1 << 30  # sine's held-out task batches: indices from here on (training draws 0 .. meta.steps - 1)


class TaskFamily(Protocol):
    spmd_axis: str | None

    def sample_tasks(self, index: int, count: int, held_out: bool = False) -> dict: ...
    def init(self) -> Any: ...
    def loss(self, params: Any, batch: Any) -> Any: ...
    def param_specs(self) -> Any: ...


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, a static argument of jit
class SineTasks:
    """Sinusoid regression (Finn et al. 2017): a task = one sinusoid; held-out tasks are batch indices from
    EVAL_OFFSET on, which training (indices 0 .. meta.steps - 1) never draws."""

    cfg: Config
    sizes: dict
    spmd_axis = None

    def sample_tasks(self, index: int, count: int, held_out: bool = False) -> dict:
        m = self.cfg.meta
        return sine.sample_tasks(m.seed, index + (EVAL_OFFSET if held_out else 0), count, m.k_support, m.k_query)

    def init(self) -> Any:
        return sine.init_mlp(self.cfg.meta.seed, self.cfg.meta.hidden)

    def loss(self, params: Any, batch: Any) -> Any:
        return sine.mse(params, batch)

    def param_specs(self) -> Any:
        return sine.param_specs(self.cfg.meta.hidden, self.sizes["tensor"], self.sizes["data"],
                                self.cfg.train.zero_stage)


def task_family(cfg: Config, mesh: Any, sizes: dict) -> TaskFamily:
    """The TaskFamily of `meta.task` (validated by loop.check_meta)."""
    if cfg.meta.task == "corpus":
        from picotron_jax.meta.corpus_tasks import CorpusTasks

        return CorpusTasks.build(cfg, mesh)
    return SineTasks(cfg, sizes)
