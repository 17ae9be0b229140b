"""Save the full train state with Orbax's CheckpointManager: async, zstd-compressed, atomic, pruned.

Layout on disk (readable with `orbax.checkpoint` alone):

    CKPT_DIR/<step>/state   Orbax PyTree (OCDBT + zarr3) of every TrainState field: step, params,
                            opt_state, and whatever fields the state grows (loss scale, RNG keys)
    CKPT_DIR/<step>/meta    JSON (metadata.py): step, tokens seen, data position, mesh, git revision,
                            package versions, raw bytes, compression, resolved config

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every file is written, so
a half-written step is never listed; leftovers of a killed save are removed when the next run opens
the folder. Old steps are deleted only after a newer one is complete. With `checkpoint.async_save`
the loop is blocked only while the arrays are copied to host memory; the write (each array kind's codec,
and a CRC32C per chunk: codecs.py) runs in a background thread, and the next save (or the end of the run)
waits for it. With `checkpoint.codec=auto` the first save also measures the candidate codecs on a sample
(codec_select.py); lossy storage of moments or parameters, when asked, is quantize.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from picotron_jax.checkpoint import codec_select, codecs, quantize
from picotron_jax.checkpoint import metadata as meta_lib
from picotron_jax.checkpoint.storage import CheckpointStore, open_store
from picotron_jax.config import Config
from picotron_jax.errors import DiskFull, is_disk_full

class _DropDiskFullLogs(logging.Filter):
    """Orbax's background threads log a full disk as ERROR with a traceback each (dozens of lines); the
    checkpointer reports it in one line (DiskFull), so exactly those records are dropped. So is the warning
    about a missing `<step>/meta/_CHECKPOINT_METADATA` that every checkpoint read printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        if message.startswith("Metadata file does not exist") and message.endswith("_CHECKPOINT_METADATA"):
            return False  # every read of a step's `meta` item looks for it one folder too deep: harmless
        return not (is_disk_full(exc) or "No space left on device" in message)


def quiet_disk_full_logs() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropDiskFullLogs) for f in logger.filters):
        logger.addFilter(_DropDiskFullLogs())


def state_tree(state: Any) -> dict[str, Any]:
    """Any TrainState (a flax.struct dataclass) as {field: subtree}: saves fields added later too."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def item_handlers(compression_level: int) -> dict[str, Any]:
    codecs.install_orbax_hook()  # the chain of each array comes from the folder's CodecPlan (codecs.py)
    return {
        "state": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=compression_level > 0),
        "meta": ocp.JsonCheckpointHandler(),
    }


def preservation_policy(keep: int, keep_every: int):
    """The newest `keep` checkpoints (0 = all) plus every step divisible by `keep_every`, forever."""
    kept = [policies.LatestN(keep if keep > 0 else None)]
    if keep_every > 0:
        kept.append(policies.EveryNSteps(keep_every))
    return policies.AnyPreservationPolicy(kept)


class Checkpointer:
    """The run's checkpoint folder: `save` from the training loop, `close` at the end."""

    def __init__(self, directory: str | Path, cfg: Config, say: Callable[[str], None] = print,
                 log_path: Path | None = None):
        self.cfg = cfg
        self.every = cfg.checkpoint.every
        quiet_disk_full_logs()
        from picotron_jax.checkpoint.restore import silence_closed_loop_callbacks

        silence_closed_loop_callbacks()  # after a failed write the other writes end in 'Event loop is closed' noise
        self.store: CheckpointStore = open_store(str(directory), cfg.checkpoint.keep, cfg.checkpoint.keep_every)
        self._say = say
        self._log_path = log_path
        self._pending: list[dict] = []  # saves whose background write may still run
        self._plan = codecs.fixed_plan(cfg.checkpoint)  # None: `auto`, measured at the first save
        self._selection: dict | None = None
        if self._plan is not None:
            codecs.register(self.store.local_root, self._plan)
        if jax.process_index() == 0:
            for leftover in self.store.unfinished():
                say(f"checkpoint: removing {leftover} (a save that never completed)")
                shutil.rmtree(leftover, ignore_errors=True)
        self._manager = ocp.CheckpointManager(
            self.store.local_root,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation_policy(cfg.checkpoint.keep, cfg.checkpoint.keep_every),
                enable_async_checkpointing=cfg.checkpoint.async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
            item_handlers=item_handlers(cfg.checkpoint.compression_level),
        )

    def save(self, state: Any, extra_meta: dict) -> float | None:
        """Start saving `state`; returns the seconds the caller was blocked (None: step already saved)."""
        step = int(state.step)
        if step in self._manager.all_steps():
            return None
        t0 = time.perf_counter()
        self._finish_pending()  # Orbax waits for the previous write anyway: account for it here
        self._check_free_space(step)
        waited = time.perf_counter() - t0
        tree = state_tree(state)
        c = self.cfg.checkpoint
        quantization = quantize.describe(c)
        stored = quantize.encode(tree, quantization)
        selected_now = self._plan is None
        if selected_now:
            self._plan, self._selection = codec_select.choose(stored, c.compression_level, c.codec_time_budget)
            codecs.register(self.store.local_root, self._plan)
        compression = meta_lib.compression_entry(c.codec, self._plan, stored, self._selection)
        meta = meta_lib.build(step, self.cfg, tree, extra_meta, stored, compression, quantization)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(stored),
                                                                     meta=ocp.args.JsonSave(meta)))
            if saved and not self.cfg.checkpoint.async_save:
                self._manager.wait_until_finished()
        except Exception as exc:  # noqa: BLE001 - only a full disk is translated, the rest re-raised
            self._raise_if_disk_full(exc, step)
            raise
        if not saved:  # Orbax skips a step older than the folder's newest: say so, never report it complete
            newest = max(self._manager.all_steps(), default=None)
            self._say(f"checkpoint {step} not saved: {self.store.url} already holds newer step {newest}")
            return None
        blocked = time.perf_counter() - t0
        event = {"step": step, "async": self.cfg.checkpoint.async_save, "blocked_s": round(blocked, 4),
                 "waited_for_previous_s": round(waited, 4), "raw_bytes": meta["raw_bytes"],
                 "codecs": dict(self._plan.by_kind), "lossy": meta["lossy"], "t_start": t0}
        if selected_now:
            event["codec_selection_s"] = self._selection["seconds"]
        self._pending.append(event)
        if not self.cfg.checkpoint.async_save:
            self._finish_pending()
        return blocked

    def _finish_pending(self) -> None:
        """Wait for background writes, then report each finished step's size (and upload it, for s3://)."""
        if not self._pending:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as exc:  # noqa: BLE001 - a background write failed
            steps = [e["step"] for e in self._pending]
            self._pending.clear()
            self._raise_if_disk_full(exc, steps[-1])
            raise
        done = time.perf_counter()
        for event in self._pending:
            started = event.pop("t_start")
            if not event["async"]:  # an async write is only seen complete at the next save or the end
                event["written_s"] = round(done - started, 4)
            if self.store.is_local and jax.process_index() == 0:
                event["bytes_by_kind"] = meta_lib.record_array_bytes(Path(self.store.local_root) / str(event["step"]))
            self.store.publish(event["step"], self._manager.all_steps())
            on_disk = self.store.bytes_on_disk(event["step"])
            event["bytes_on_disk"] = on_disk
            ratio = f", {on_disk / event['raw_bytes']:.2f} of raw" if on_disk and event["raw_bytes"] else ""
            self._say(f"checkpoint {event['step']} complete: {meta_lib.human_bytes(on_disk)} on disk"
                      f"{ratio} ({self.store.describe(event['step'])})")
            if self._log_path is not None and jax.process_index() == 0:
                with open(self._log_path, "a") as f:
                    f.write(json.dumps(event) + "\n")
        self._pending.clear()

    def _last_size(self) -> int | None:
        """Bytes on disk of the newest complete step (the estimate of the next one's size)."""
        steps = self._manager.all_steps()
        return self.store.bytes_on_disk(max(steps)) if steps else None

    def _check_free_space(self, step: int) -> None:
        """Refuse a save that cannot fit (DiskFull, nothing written), judged by the previous step's size."""
        needed = self._last_size()
        if not needed or not self.store.is_local:
            return
        free = shutil.disk_usage(self.store.local_root).free
        if free < needed:
            raise DiskFull(self._full_message(step, needed, free))

    def _full_message(self, step: int, needed: int | None, free: int | None) -> str:
        previous = [s for s in self._manager.all_steps() if s != step]
        kept = (f"the previous checkpoint {self.store.describe(max(previous))} is intact" if previous
                else "no earlier checkpoint exists")
        need = f" (needs about {meta_lib.human_bytes(needed)})" if needed else ""
        have = f" {meta_lib.human_bytes(free)} free" if free is not None else ""
        return (f"disk full: {self.store.local_root} ({have.strip() or 'no space left'}); the checkpoint of step "
                f"{step}{need} not saved; {kept}. Free space or set checkpoint.dir to a larger disk, then --resume")

    def _raise_if_disk_full(self, exc: BaseException, step: int) -> None:
        """A failed write for lack of space becomes DiskFull, after its temporary folders are removed."""
        if not is_disk_full(exc):
            return
        if jax.process_index() == 0:
            for leftover in self.store.unfinished():
                shutil.rmtree(leftover, ignore_errors=True)
        try:
            self._manager.reload()
        except Exception:  # noqa: BLE001 - the folder listing is best effort here
            pass
        free = shutil.disk_usage(self.store.local_root).free if self.store.is_local else None
        raise DiskFull(self._full_message(step, self._last_size(), free)) from None

    def reload(self) -> None:
        """Re-read the folder's steps (after a restore moved unusable ones aside)."""
        self._manager.reload()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait(self) -> None:
        """Wait for background writes and report them (the end of a run)."""
        self._finish_pending()

    def step_dir(self, step: int) -> str:
        return self.store.describe(step)

    def close(self) -> None:
        """Wait for the last write (nothing is lost on a clean exit), then release Orbax's threads."""
        try:
            self._finish_pending()
        finally:
            self._manager.close()
            if self._plan is not None:
                codecs.unregister(self.store.local_root, self._plan)
