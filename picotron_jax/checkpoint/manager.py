"""Save and restore the full train state with Orbax's CheckpointManager.

Layout on disk: CKPT_DIR/<step>/state (an Orbax PyTree checkpoint of {step, params, opt_state})
and CKPT_DIR/<step>/meta (JSON: step, tokens seen, mesh, resolved config). Orbax writes into a
temporary folder and renames it when complete, so a half-written step is never picked up.
The data position needs no saving: batch i is a pure function of (seed, corpus, i).

Restoring passes the target shardings of the *current* mesh, so a checkpoint saved on one
layout loads onto another (Orbax/TensorStore reads each device's slice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from picotron_jax.config import Config
from picotron_jax.errors import UserError
from picotron_jax.train.state import TrainState


def _as_tree(state: TrainState) -> dict[str, Any]:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.loss_scale is not None:  # fp16 runs: dynamic loss scale and overflow counts (train/precision.py)
        tree["loss_scale"] = state.loss_scale
    return tree


class Checkpointer:
    def __init__(self, directory: Path, cfg: Config):
        self.directory = Path(directory).absolute()
        self.every = cfg.checkpoint.every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.checkpoint.keep or None,
                enable_async_checkpointing=False,
                create=True,
            ),
        )

    def should_save(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    def save(self, state: TrainState, cfg: Config, extra_meta: dict) -> None:
        step = int(state.step)
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_tree(state)),
                meta=ocp.args.JsonSave({"step": step, **extra_meta, "config": cfg.to_dict()}),
            ),
        )
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, abstract: TrainState, shardings: TrainState, step: int | None = None) -> TrainState:
        """Load `step` (default: newest) laid out by `shardings` (the current mesh's)."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise UserError(
                f"--resume: no checkpoint in {self.directory}; start without --resume or point checkpoint.dir at a "
                f"folder that holds one"
            )
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _as_tree(abstract), _as_tree(shardings)
        )
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        tree = restored["state"]
        return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                          loss_scale=tree.get("loss_scale"))

    def close(self) -> None:
        self._manager.close()
