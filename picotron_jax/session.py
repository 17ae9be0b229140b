"""A built run with its train state, checkpoints and console: what the loop (trainer.py) drives.

Construction validates everything before writing anything: the run is built (config checks, mesh,
data), the callbacks resolved, the state initialised or restored, and only then is config.yaml
written into the run directory. The state starts from the seed, a checkpoint (`resume`: the newest
good step of the run's checkpoint folder; `resume_from`: a folder or one step), or a Hugging Face
model (`init_from_hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from picotron_jax import rundir
from picotron_jax.checkpoint.finite import check_before_save
from picotron_jax.checkpoint.manager import Checkpointer
from picotron_jax.checkpoint.restore import default_location, read_meta, restore_train_state, split_location
from picotron_jax.checkpoint.storage import check_location, open_store
from picotron_jax.config import Config, config_from_dict, load_config, save_config
from picotron_jax.errors import UserError
from picotron_jax.mesh import describe
from picotron_jax.observe.console import banner
from picotron_jax.observe.flops import run_peak_flops
from picotron_jax.observe.metrics import StepRows
from picotron_jax.observe.shardings import ShardingTable, sharding_table
from picotron_jax.run import build_run
from picotron_jax.train.promotion import promoted_setup
from picotron_jax.train.state import init_train_state


class Session:
    cfg: Config
    run_dir: Path | None

    def _open(self, cfg: Config, run_dir, make_callbacks, resume: bool, resume_from: str | None,
              init_from_hf: str | None, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._lock = None
        new_run = not (resume or resume_from)
        if (early := self._checkpoint_location()) is not None:
            check_location(early)
        if self.run_dir is not None and jax.process_index() == 0:  # rundir.py: one run per directory
            rundir.check_run_dir(self.run_dir, new_run, overwrite, early)
        self.built = build_run(cfg)
        self.built.train_step  # noqa: B018 - builds the step now: its checks run before anything is written
        self.callbacks = make_callbacks()
        self.peak_flops, self.peak_source = run_peak_flops(self.built.devices, cfg.logging.peak_flops)
        for line in banner(self.built, self.peak_flops, self.peak_source):
            self.say(line)
        self._compiled, self._last_eval = False, -1
        self._sync_every_step = jax.process_count() > 1 and self.built.devices[0].platform == "cpu"
        location = self._checkpoint_location()
        if resume or resume_from:
            self._restore(resume_from or location, fallback=not resume_from)
        elif init_from_hf:
            from picotron_jax.checkpoint.hf import train_state_from_hf

            self.state = train_state_from_hf(init_from_hf, cfg, self.built.setup)
            self.say(f"initialised from the Hugging Face model in {init_from_hf}")
        else:
            self.state = init_train_state(cfg, self.built.setup)
        self.step_count = int(self.state.step)
        if self.run_dir is not None and jax.process_index() == 0:
            if new_run and overwrite:
                rundir.move_aside(self.run_dir, location, self.say)
            self._lock = rundir.RunLock(self.run_dir, self.say)
            if not new_run and (dropped := rundir.truncate_to_step(self.run_dir, self.step_count)):
                self.say(f"resumed at step {self.step_count}: dropped the rows past it from {', '.join(dropped)}")
        self.checkpointer = None if location is None else self._checkpointer(location)
        self._rows = StepRows(cfg, self.built.devices, self.peak_flops, self._t_start)
        if self.run_dir is not None and self.built.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

    def _checkpointer(self, location: str) -> Checkpointer:
        log = self.run_dir / "checkpoints.jsonl" if self.run_dir is not None else None
        return Checkpointer(location, self.cfg, say=self.say, log_path=log)

    def _checkpoint_location(self) -> str | None:
        if self.run_dir is None and not self.cfg.checkpoint.dir:
            return None
        return default_location(self.cfg, self.run_dir or Path("."))

    # -- the console --------------------------------------------------------------------------
    def say(self, message: str, everywhere: bool = False) -> None:
        """Print a line (process 0 only, unless `everywhere`)."""
        if everywhere or jax.process_index() == 0:
            self.console.print(message)

    def add_callback(self, callback):
        """Add a loop callback (fired after the others); returns it."""
        self.callbacks.callbacks.append(callback)
        return callback

    # -- what a notebook looks at ----------------------------------------------------------------
    @property
    def mesh(self):
        return self.built.mesh

    @property
    def params(self) -> Any:
        """The parameters: a nested dict of jax.Arrays, each with its sharding on the mesh."""
        return self.state.params

    def batch(self, index: int) -> dict:
        """Training batch `index` (what step index + 1 trains on), placed on the mesh."""
        return self.built.batch(index)

    def shardings(self) -> ShardingTable:
        """Parameter path, global shape, partition spec and bytes per device of every parameter."""
        return sharding_table(self.state.params)

    def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, seed: int | None = None) -> str:
        """The continuation of `prompt` (KV-cache decoding on this mesh); defaults from config `generate`."""
        from picotron_jax.generate import Sampling, generate_text

        sampling = Sampling.from_config(self.cfg, max_new_tokens, temperature, top_k, seed)
        return generate_text(self.cfg, self.built.rules, self.state.params, prompt, sampling)

    # -- changes -----------------------------------------------------------------------------
    def reconfigure(self, **sections: dict) -> "Session":
        """Go on with changed settings (`optimizer={"lr": 1e-3}`, a new mesh, ...) and the same train state,
        moved onto the new layout; the step is rebuilt. Settings that change the state's arrays (the model,
        fp16's loss scale, ...) are refused."""
        cfg = self.cfg.replace(**sections)
        run = build_run(cfg, promoted=tuple(self.built.setup.policy.promoted))
        old, new = self.built.setup.abstract, run.setup.abstract
        if jax.tree.structure(old) != jax.tree.structure(new) or any(
                (a.shape, a.dtype) != (b.shape, b.dtype) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))):
            raise UserError("reconfigure: the new settings change the train state's arrays (model, MoE layout or "
                            "fp16 loss scale); start a new Trainer, or save and restore with the new settings")
        self.state = jax.device_put(self.state, run.setup.shardings)
        if cfg.checkpoint != self.cfg.checkpoint and self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        self.cfg, self.built, self._compiled = cfg, run, False
        self._rows = StepRows(cfg, run.devices, self.peak_flops, self._t_start)
        location = self._checkpoint_location()
        if self.checkpointer is None and location is not None:
            self.checkpointer = self._checkpointer(location)
        return self

    def _apply_requests(self) -> bool:
        """Act on what callbacks asked during the step; True when the state moved to another step."""
        state, setup, restore, save = self.control.take_step_requests()
        if state is not None:
            self.state = state
        if setup is not None:
            self.built, self._compiled = self.built.with_setup(setup), False
        if restore:
            self._restore(self._checkpoint_location(), fallback=True)
            self.step_count = int(self.state.step)
        if save:
            self.save()
        return restore

    # -- checkpoints -------------------------------------------------------------------------
    def _restore(self, location: str | None, fallback: bool) -> None:
        if location is None:
            raise UserError("this trainer has no checkpoint folder to restore from: give it a run_dir, or set "
                            "checkpoint.dir")
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.wait()  # an asynchronous save still being written is a checkpoint to restore
        store = self.checkpointer.store if fallback and getattr(self, "checkpointer", None) else None
        state, meta, where = restore_train_state(location, self.built.setup.abstract, self.built.setup.shardings, self.cfg,
                                              self.say, store, set_aside_unusable=fallback and self.run_dir is not None)
        if store is not None:
            self.checkpointer.reload()
        self.state = state
        self.callbacks.load_state_dicts(meta.get("callbacks") or {})  # callback.py: state in the checkpoint
        self.say(f"resumed from {where} at step {int(state.step)}")
        if state.loss_scale is not None:  # fp16: promotions are re-derived from the saved overflow counts
            change = promoted_setup(self.cfg, self.built.rules, self.built.setup, jax.device_get(
                state.loss_scale.module_overflows))
            if change is not None:
                self.built, self._compiled = self.built.with_setup(change[0]), False
                self.say(change[1])

    def _save(self) -> tuple[str, float | None]:
        if self.checkpointer is None:
            raise UserError("this trainer has no checkpoint folder: create it with a run_dir "
                            "(Trainer(cfg, run_dir=...)) or set checkpoint.dir")
        if self.step_count in self.checkpointer.all_steps():
            return self.checkpointer.step_dir(self.step_count), None
        check_before_save(self)  # a non-finite state is never written (checkpoint/finite.py)
        extra = {"tokens_seen": self.step_count * self.built.tokens_per_step, "mesh": describe(self.built.mesh)}
        if states := self.callbacks.state_dicts():
            extra["callbacks"] = states
        blocked = self.checkpointer.save(self.state, extra)
        return self.checkpointer.step_dir(self.step_count), blocked

    @classmethod
    def restore(cls, path: str | Path, cfg: Config | None = None, **kwargs) -> "Session":
        """A trainer continuing from a run directory (its config.yaml and newest good checkpoint) or from a
        checkpoint folder / step folder (the config saved in the checkpoint, unless `cfg` is given)."""
        path = Path(path)
        if (path / "config.yaml").is_file():  # a run directory: it continues there unless run_dir says otherwise
            cfg = cfg or load_config(path / "config.yaml")
            kwargs.setdefault("run_dir", path)
            return cls(cfg, resume_from=default_location(cfg, path), **kwargs)
        if cfg is None:
            root, step = split_location(str(path))
            store = open_store(root, 0, 0)
            steps = store.steps()
            if not steps or (step is not None and step not in steps):
                raise UserError(f"no checkpoint at {path}; give a run directory (with config.yaml) or a "
                                f"checkpoint folder / step folder")
            cfg = config_from_dict(read_meta(store.fetch(step if step is not None else steps[-1]))["config"])
        return cls(cfg, resume_from=str(path), **kwargs)

    def close(self) -> None:
        """Release files and background threads (waits for checkpoint writes)."""
        self.callbacks.fire("on_close", self)
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
                self.checkpointer = None
        finally:
            if getattr(self, "_lock", None) is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
