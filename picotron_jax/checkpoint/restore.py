"""Restore a train state onto the current mesh, falling back past unreadable checkpoints.

Restoring passes the *current* mesh's shardings as targets, so a checkpoint saved on one layout
loads onto another: TensorStore reads each device's slice of each array. Every chunk carries a
CRC32C (codecs.py) that TensorStore verifies on read, so truncated files, damaged bytes and
half-deleted folders all fail the read; `--resume` then says so in one line and tries the next
older step. A checkpoint named explicitly (`--resume-from PATH/<step>`) gets no fallback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from picotron_jax.checkpoint import quantize
from picotron_jax.checkpoint.finite import state_is_finite
from picotron_jax.checkpoint.manager import quiet_disk_full_logs, state_tree
from picotron_jax.checkpoint.metadata import array_differences, leaf_names, model_differences
from picotron_jax.checkpoint.storage import CheckpointStore, open_store
from picotron_jax.config import Config
from picotron_jax.errors import UserError


class UnreadableCheckpoint(Exception):
    """A checkpoint whose files are missing, truncated or damaged."""


def split_location(path: str) -> tuple[str, int | None]:
    """'run/checkpoints/6' -> ('run/checkpoints', 6); 'run/checkpoints' -> ('run/checkpoints', None)."""
    trimmed = path.rstrip("/")
    parent, _, name = trimmed.rpartition("/")
    local = Path(trimmed) if "://" not in trimmed else None
    if local is not None and local.is_dir() and not (local / "state").is_dir():
        return trimmed, None  # a checkpoint folder (even one whose own name is a number)
    if name.isdigit() and parent:
        return parent, int(name)
    return trimmed, None


def read_meta(step_dir: Any) -> dict:
    quiet_disk_full_logs()
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    except Exception as exc:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
        raise UnreadableCheckpoint(f"its metadata cannot be read ({short_error(exc)})") from None


def short_error(exc: BaseException) -> str:
    """The first line of the innermost cause (TensorStore's own message, e.g. 'DATA_LOSS: ... Digest
    mismatch'), not Orbax's wrapper that prints the whole spec."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def silence_closed_loop_callbacks() -> None:
    """After a failed read, Orbax closes its event loop while TensorStore still completes the other reads;
    their callbacks then report 'Event loop is closed' as unraisable exceptions, a traceback each on stderr.
    The failure itself has been reported in one line; drop exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "__picotron_quiet__", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.__picotron_quiet__ = True
    sys.unraisablehook = hook
    previous_excepthook = sys.excepthook  # TensorStore's callbacks print theirs with PyErr_Print (sys.excepthook)

    def excepthook(kind, value, tb):
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous_excepthook(kind, value, tb)

    sys.excepthook = excepthook


def _target(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state_tree(abstract), state_tree(shardings))


def restore_step(step_dir: Any, abstract: Any, shardings: Any, cfg: Config) -> tuple[Any, dict]:
    """One checkpoint folder -> (TrainState laid out by `shardings`, its metadata)."""
    meta = read_meta(step_dir)
    differences = model_differences(meta, cfg)
    if differences:
        raise UserError(f"checkpoint {step_dir} was saved with another model: {'; '.join(differences)}. Resume "
                        f"with the checkpoint's model settings, or start a new run without --resume")
    quantization = meta.get("quantization")
    if quantize.is_lossy(quantization) and cfg.checkpoint.require_lossless:
        raise UserError(f"checkpoint {step_dir} stores part of the state lossy ({lossy_summary(quantization)}), but "
                        f"checkpoint.require_lossless is set: resume from a lossless checkpoint, or drop the flag")
    target = _target(abstract, shardings)
    stored_target = quantize.stored_target(target, quantization)
    mismatch = array_differences(meta, leaf_names(stored_target))
    if mismatch:
        raise UserError(f"checkpoint {step_dir} holds other arrays than this run's train state "
                        f"({'; '.join(mismatch)}): it was written with other settings (e.g. precision.mode fp16 adds a loss scale, "
                        f"moe.bias_update_rate > 0 a router bias, monitor.on_spike=skip the spike windows). Resume with the "
                        f"checkpoint's settings")
    saved_fields = set(meta.get("fields", target))
    if saved_fields != set(target):
        raise UserError(f"checkpoint {step_dir} holds train-state fields {sorted(saved_fields)} but this run's "
                        f"state has {sorted(target)}; it was written by a different train state")
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            tree = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                item=stored_target, restore_args=ocp.checkpoint_utils.construct_restore_args(stored_target)))
    except Exception as exc:  # noqa: BLE001 - TensorStore/Orbax raise many types for damaged files
        silence_closed_loop_callbacks()
        raise UnreadableCheckpoint(f"its arrays cannot be read ({short_error(exc)})") from None
    state = type(abstract)(**quantize.decode(tree, target, quantization))
    if not state_is_finite(state):
        raise UnreadableCheckpoint("it holds NaN or infinite values (a diverged state)")
    return state, meta


def lossy_summary(quantization: dict) -> str:
    """'first_moment int8, second_moment int8' for the kinds stored lossy."""
    return ", ".join(f"{k} {quantization[k]}" for k in ("params", "first_moment", "second_moment")
                     if quantization.get(k, "none") != "none")


def restore_train_state(location: str, abstract: Any, shardings: Any, cfg: Config,
                        say: Callable[[str], None] = print,
                        store: CheckpointStore | None = None,
                        set_aside_unusable: bool = False) -> tuple[Any, dict, str]:
    """Newest readable checkpoint under `location` (a checkpoint folder), or exactly `location/<step>`.

    `set_aside_unusable` (a run resuming to train on): the unusable newer steps are moved aside
    (storage.set_aside), so they are saved again and do not count toward `keep`.
    Returns (train state, its metadata, where it was read from)."""
    root, step = split_location(location)
    if store is None:
        store = open_store(root, cfg.checkpoint.keep, cfg.checkpoint.keep_every)
    steps = store.steps()
    if step is not None:
        if step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise UserError(f"no checkpoint at step {step} in {root} (steps there: {have})")
        try:
            return (*restore_step(store.fetch(step), abstract, shardings, cfg), store.describe(step))
        except UnreadableCheckpoint as exc:
            raise UserError(f"checkpoint {store.describe(step)} is unusable: {exc}") from None
    if not steps:
        raise UserError(f"no checkpoint in {root}; start without --resume, or point checkpoint.dir / --resume-from "
                        f"at a folder that holds one")
    failures, unusable = [], []
    for candidate in reversed(steps):
        try:
            restored = (*restore_step(store.fetch(candidate), abstract, shardings, cfg), store.describe(candidate))
        except UnreadableCheckpoint as exc:
            failures.append(f"step {candidate}: {exc}")
            unusable.append(candidate)
            older = [s for s in steps if s < candidate]
            nxt = f"falling back to step {older[-1]}" if older else "no older checkpoint"
            say(f"checkpoint {store.describe(candidate)} is unusable, {exc}; {nxt}")
            continue
        if set_aside_unusable and jax.process_index() == 0:  # the run re-saves those steps when it gets there
            for bad in unusable:
                if (moved := store.set_aside(bad)) is not None:
                    say(f"checkpoint: moved unusable step {bad} aside to {moved}; it is saved again at step {bad}")
        if set_aside_unusable and unusable and jax.process_count() > 1:  # the others see the moves
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoint set_aside")
        return restored
    raise UserError(f"no usable checkpoint in {root}: " + "; ".join(failures))


def default_location(cfg: Config, run_dir: Path) -> str:
    return cfg.checkpoint.dir or str(run_dir / "checkpoints")
