"""Replaying a recorded step: `picotron-jax debug replay RUN_DIR --step K` (and the restore that
`debug nan` shares).

A step is a pure function of the state before it, its batch (batch K - 1, a pure function of the seed,
the data and the index) and the in-step fault flags of step K; the state carries the step counter the
schedule and any randomness derive from. So the newest checkpoint before K, stepped to K - 1 on one
process, reproduces the state step K started from, and replaying K must give back, bit for bit, what
the run recorded: the row of step K in RUN_DIR/metrics.jsonl (loss, gradient norm, learning rate, z-loss,
tokens: float32 values, stored exactly as JSON numbers) and, when the run saved a checkpoint of step K,
every parameter and optimizer-state array of it. The first difference is named; a replay that differs
points at non-determinism (a transient hardware fault, a race, a changed library) rather than the math.

The replay runs without a run directory and without the run's checkpoint folder: it writes nothing; it
has no breakpoints, replica checks or `logging.callbacks`, and none of the fault injector's hangs, sleeps
or slow reads (they change no value).
A `faults.transient` fault of step K fired in the recorded run and is not fired again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from picotron_jax.errors import UserError

RECORDED = ("loss", "grad_norm", "lr", "z_loss", "tokens")  # the row fields a replay must reproduce exactly


def load_run(run_dir: str | Path):
    """(config, checkpoint location) of a run directory."""
    from picotron_jax.checkpoint.restore import default_location
    from picotron_jax.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    return cfg, default_location(cfg, run_dir)


def saved_steps(location: str) -> list[int]:
    from picotron_jax.checkpoint.storage import open_store

    return open_store(location, 0, 0).steps() if Path(location).exists() else []


def trainer_before(cfg, location: str, step: int, command: str):
    """(trainer at step - 1, the checkpoint step it started from): the newest checkpoint before `step`
    restored on a trainer that writes nothing, stepped to step - 1."""
    from picotron_jax.trainer import Trainer

    before = [s for s in saved_steps(location) if s < step]
    if step < 1 or not before:
        raise UserError(f"--step {step}: {location} has no checkpoint before step {step} (checkpoint.every sets how "
                        f"often a run saves); {command} replays from one")
    # writes nothing, stops nowhere; the faults that change no value (hangs, sleeps, slow reads) are left out
    quiet = cfg.replace(checkpoint={"dir": ""}, logging={"callbacks": []},
                        debug={"break_when": "", "check_every": 0, "nan_origin": False},
                        faults={"hang_step": 0, "sleep_step": 0, "slow_read_s": 0.0})
    trainer = Trainer(quiet, resume_from=f"{location}/{before[-1]}")
    try:
        while trainer.step_count < step - 1:
            trainer.step()
        faults = trainer.built.faults
        if faults is not None and cfg.faults.transient:
            faults.flags(step)  # a transient fault fired in the recorded run; it does not come back on a replay
    except BaseException:
        trainer.close()
        raise
    return trainer, before[-1]


@dataclass
class Replay:
    """What replaying one step gave, against what the run recorded."""

    step: int
    checkpoint: int  # the checkpoint the replay started from
    compared: list[str] = field(default_factory=list)  # what was compared ("metrics row", "checkpoint K")
    differences: list[str] = field(default_factory=list)  # one line per differing value, first first

    @property
    def identical(self) -> bool:
        return not self.differences

    def describe(self) -> str:
        head = f"step {self.step} replayed from checkpoint {self.checkpoint}"
        if not self.compared:
            return f"{head}: nothing recorded to compare with (no metrics row and no checkpoint of step {self.step})"
        if self.identical:
            return f"{head}: bitwise identical to the recorded {' and '.join(self.compared)}"
        return (f"{head}: differs from the recorded {' and '.join(self.compared)}\n  "
                + "\n  ".join(self.differences))


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def recorded_row(run_dir: Path, step: int) -> dict | None:
    """The last training row of `step` in RUN_DIR/metrics.jsonl (a rewound run may log a step twice)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]
    return next((r for r in reversed(rows) if r.get("step") == step), None)


def compare_rows(replayed: dict, recorded: dict) -> list[str]:
    return [f"{name}: replayed {replayed[name]!r}, recorded {recorded[name]!r}" for name in RECORDED
            if name in recorded and not _same(float(replayed[name]), float(recorded[name]))]


def compare_states(replayed, recorded) -> list[str]:
    """The arrays of two train states that are not bitwise equal, named by their path."""
    out = []
    flat_b = dict(jax.tree_util.tree_flatten_with_path(recorded)[0])
    for path, a in jax.tree_util.tree_flatten_with_path(replayed)[0]:
        a, b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(flat_b[path]))
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            diff = (f"{int((a != b).sum())} of {a.size} elements differ, max |difference| "
                    f"{float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))):.3g}"
                    if a.shape == b.shape and np.issubdtype(a.dtype, np.number) else f"{a.dtype}{list(a.shape)} vs "
                                                                                    f"{b.dtype}{list(b.shape)}")
            out.append(f"{name}: {diff}")
    return out


def replay_step(run_dir: str | Path, step: int, say=print) -> Replay:
    """Re-run step `step` of RUN_DIR from the newest checkpoint before it; compare with what was recorded."""
    from picotron_jax.checkpoint.restore import restore_train_state

    run_dir = Path(run_dir)
    cfg, location = load_run(run_dir)
    trainer, start = trainer_before(cfg, location, step, "debug replay")
    try:
        say(f"replaying step {step} from checkpoint {start} on batch {step - 1}")
        row = trainer.step()
        out = Replay(step, start)
        if (recorded := recorded_row(run_dir, step)) is not None:
            out.compared.append("metrics row")
            out.differences += compare_rows(row, recorded)
        if step in saved_steps(location):
            setup = trainer.built.setup
            state, _, _ = restore_train_state(f"{location}/{step}", setup.abstract, setup.shardings, trainer.cfg,
                                              lambda _: None)
            out.compared.append(f"checkpoint {step}")
            out.differences += compare_states(trainer.state, state)
        return out
    finally:
        trainer.close()
