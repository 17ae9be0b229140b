"""What a run builds before its first step, in one place: every command, benchmark and test uses it.

`build_run(cfg)` validates the whole config, builds the mesh and the logical-axis rules, opens the
data (optional: compile-only tools run without it), sets up the train state's shapes and shardings
and the jitted step (nothing compiles until it first runs). A `Run` is immutable: a change that
needs a new step (precision promotion, a reconfigured trainer) makes a new `Run` with `with_setup`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import jax

from picotron_jax.config import Config
from picotron_jax.config_checks import validate
from picotron_jax.data import TokenDataset, eval_batch, global_batch
from picotron_jax.data.sources import open_dataset
from picotron_jax.errors import UserError
from picotron_jax.mesh import build_mesh, run_devices
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train.faults import InStepFaults
from picotron_jax.train.state import StateSetup, setup_state
from picotron_jax.train.step import Batch, build_train_step


@dataclass(frozen=True)
class Run:
    cfg: Config
    devices: list
    mesh: Any
    rules: MeshRules
    setup: StateSetup
    dataset: TokenDataset | None = None  # None: built without data (compile-only tools)
    faults: InStepFaults | None = None  # the fault injector's in-step faults, when configured

    @cached_property
    def train_step(self) -> Any:
        """Jitted (state, batch[, fault flags]) -> (state, metrics); the state is donated. Built on first
        use, compiled on first call."""
        return build_train_step(self.cfg, self.rules, self.setup)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch * self.cfg.train.seq_len

    def batch(self, index: int) -> Batch:
        """Batch `index` (the one the step numbered index + 1 trains on), placed on the mesh."""
        return global_batch(self._data(), index, self.cfg.train.global_batch, self.rules.batch_sharding())

    def step(self, state: Any, batch: Batch, number: int) -> tuple[Any, dict]:
        """Run the step numbered `number` (1-based; arms the in-step faults configured for it)."""
        if self.faults is None:
            return self.train_step(state, batch)
        return self.train_step(state, batch, self.faults.flags(number))

    # -- evaluation ------------------------------------------------------------------------
    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval.batch or self.cfg.train.global_batch

    def eval_batches(self) -> Iterator[Batch]:
        """The held-out split (config `eval`) as placed batches, in order."""
        ds = self._data()
        if not ds.num_held_out:
            raise UserError("this run has no validation split: set eval.tokens (or eval.fraction) to hold out part "
                            "of the corpus, e.g. eval.tokens=16384")
        B = self.eval_batch_size
        return (eval_batch(ds, i, B, self.rules.batch_sharding()) for i in range(ds.eval_batches(B)))

    @cached_property
    def eval_step(self):
        from picotron_jax.train.evaluate import build_eval_step

        return build_eval_step(self.cfg, self.rules, self.setup)

    # -- changes ---------------------------------------------------------------------------
    def with_setup(self, setup: StateSetup) -> "Run":
        """The same run with another state setup (e.g. promoted precision) and its rebuilt step."""
        return dataclasses.replace(self, setup=setup)

    def _data(self) -> TokenDataset:
        if self.dataset is None:
            raise UserError("this run was built without data (build_run(cfg, data=False)); build it with data")
        return self.dataset


def build_run(cfg: Config, *, data: bool = True, devices: list | None = None,
              promoted: tuple[str, ...] = ()) -> Run:
    """Validate everything, then build mesh, rules, data (if `data`) and the state setup; the jitted step
    is built when first used (`Run.train_step`).

    `devices`: the devices to run on (default: those `mesh.num_devices` selects); `promoted`: modules
    already moved to fp32 by precision promotion (train/promotion.py)."""
    devices = run_devices(cfg.mesh) if devices is None else devices
    validate(cfg, len(devices))
    mesh = build_mesh(cfg.mesh, devices)
    rules = MeshRules.from_config(mesh, cfg)
    dataset = None
    if data:
        dataset = open_dataset(cfg.data, cfg.train.seq_len, cfg.train.seed,
                               held_out=(cfg.eval.tokens, cfg.eval.fraction))
        if dataset.vocab_size > cfg.model.vocab_size:
            raise UserError(
                f"config field 'model.vocab_size' = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({dataset.vocab_size} tokens, data.tokenizer = {cfg.data.tokenizer!r}); set model.vocab_size to at "
                f"least {dataset.vocab_size} (rounded up to a multiple of mesh.tensor)"
            )
    setup = setup_state(cfg, rules, promoted)
    faults = InStepFaults(cfg.faults) if cfg.faults.in_step else None
    return Run(cfg, devices, mesh, rules, setup, dataset, faults)
