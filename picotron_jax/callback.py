"""The loop's events and what a callback may ask of the loop (Keras/Lightning callbacks, Levanter hooks).

The training loop (trainer.py) only runs steps and fires events; everything else a run does (the
log line, the progress bar, metrics.jsonl, checkpoints, precision promotion, the watchdog, fault
injection, and every feature added later) is a `Callback`. This module imports nothing from the
package, so a service at any floor can implement the protocol.

Events, in the order they fire (`step` is the number of optimizer steps done, 1-based):

    on_run_start(trainer)                      each `Trainer.run()`, before its first step
      per step:
        on_step_start(trainer, step)           before step `step` is dispatched (host only)
        on_step_dispatched(trainer, step, outputs)  right after the dispatch, before anything waits for
                                               the step: device work queued here runs behind it (never sync)
        on_log(trainer, row)                   logging steps: `row` is a dict of plain numbers
        on_eval(trainer, row)                  evaluation steps: eval_loss, eval_ppl, eval_tokens
        on_step_end(trainer, step, outputs)    `outputs`: the step's metrics as *device* arrays
        on_checkpoint(trainer, step, path)     after a save of that step was started
    on_run_end(trainer, summary)               the run's Summary (summary.error set if it raised)
    on_close(trainer)                          `Trainer.close()`: release files and threads

`wrap_batches(read) -> read` composes the batch reader (`read(index) -> batch`, run on the prefetch
thread) once per run: slow or transformed data goes there, not into the loop.

State in the checkpoint (PyTorch's `state_dict` / `load_state_dict` pair, as Lightning's callbacks have):
a callback whose decisions the next steps depend on (the gated curriculum's stage starts) returns them
from `state_dict() -> dict | None` (plain JSON values; None: nothing to keep). Every save stores the
non-None ones in the checkpoint's metadata under `callbacks`, keyed by the callback's class name (one
stateful callback per class); every restore (`--resume`, `Trainer.restore`, a rewind) hands each
callback its own dict with `load_state_dict(state)` before the loop continues. A callback the checkpoint
holds nothing for is not called.

Rules: a callback never syncs the device on every step unless it asks for it (reading `outputs`
with `jax.device_get` is a sync; reading `row` is free, it was fetched for the log). It does not
change `trainer.state` directly: it asks the loop through `trainer.control` (stop, save now,
restore the last checkpoint), which acts after the step's events. Host-side faults may replace
the state with `trainer.control.replace_state` (the fault injector, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class Callback:
    """Override the events you need; every method is a no-op by default."""

    def on_run_start(self, trainer: Any) -> None:
        pass

    def on_step_start(self, trainer: Any, step: int) -> None:
        pass

    def on_step_dispatched(self, trainer: Any, step: int, outputs: dict) -> None:
        pass

    def on_log(self, trainer: Any, row: dict) -> None:
        pass

    def on_eval(self, trainer: Any, row: dict) -> None:
        pass

    def on_step_end(self, trainer: Any, step: int, outputs: dict) -> None:
        pass

    def on_checkpoint(self, trainer: Any, step: int, path: str) -> None:
        pass

    def on_run_end(self, trainer: Any, summary: Any) -> None:
        pass

    def on_close(self, trainer: Any) -> None:
        pass

    def wrap_batches(self, read: Callable[[int], Any]) -> Callable[[int], Any]:
        return read

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


EVENTS = ("on_run_start", "on_step_start", "on_step_dispatched", "on_log", "on_eval", "on_step_end", "on_checkpoint", "on_run_end",
          "on_close")


@dataclass
class LoopControl:
    """Requests to the loop, honoured after the current step's events (in this order: replace the
    state or the setup, restore, save, stop)."""

    stop_reason: str = ""
    save_requested: bool = False
    restore_requested: bool = False
    new_state: Any = None
    new_setup: Any = None

    def stop(self, reason: str) -> None:
        """End the run after this step (a final checkpoint follows the checkpoint settings)."""
        self.stop_reason = self.stop_reason or reason

    def save(self) -> None:
        """Save a checkpoint of this step now."""
        self.save_requested = True

    def restore(self) -> None:
        """Go back to the newest good checkpoint; the loop continues from its step."""
        self.restore_requested = True

    def replace_state(self, state: Any) -> None:
        """Continue from this train state (same structure and shardings) instead of the step's."""
        self.new_state = state

    def replace_setup(self, setup: Any) -> None:
        """Continue with this state setup (same arrays, e.g. other compute dtypes): the step is rebuilt."""
        self.new_setup = setup

    def take_step_requests(self) -> tuple[Any, Any, bool, bool]:
        """(new state, new setup, restore?, save?) asked for during this step; clears them."""
        out = (self.new_state, self.new_setup, self.restore_requested, self.save_requested)
        self.new_state, self.new_setup, self.restore_requested, self.save_requested = None, None, False, False
        return out


class CallbackList:
    """Fires each event on every callback, in list order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def fire(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            handler = getattr(cb, event, None)  # duck-typed callbacks need only the events they use
            if handler is not None:
                handler(*args)

    def wrap_batches(self, read: Callable[[int], Any]) -> Callable[[int], Any]:
        for cb in self.callbacks:
            if hasattr(cb, "wrap_batches"):
                read = cb.wrap_batches(read)
        return read

    def state_dicts(self) -> dict[str, dict]:
        """{class name: state} of the callbacks with a state to checkpoint."""
        out: dict[str, dict] = {}
        for cb in self.callbacks:
            state = cb.state_dict() if hasattr(cb, "state_dict") else None
            if state is not None:
                name = type(cb).__name__
                if name in out:
                    raise RuntimeError(f"two {name} callbacks have a checkpoint state: it is keyed by class name")
                out[name] = state
        return out

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        """Give each callback its state from a checkpoint's `callbacks` entry (those it holds one for)."""
        for cb in self.callbacks:
            if type(cb).__name__ in states and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(states[type(cb).__name__])

    def __iter__(self):
        return iter(self.callbacks)
