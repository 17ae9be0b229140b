"""Which callbacks a run has: the built-in ones its config asks for, then the ones `logging.callbacks`
names, then the ones passed to `Trainer(callbacks=[...])`, fired in that order; with the monitor on, the step
clock's two stamps (observe/step_time.py) fire before and after all of them.

A name in `logging.callbacks` is either registered (`register_callback(name, factory)`, e.g. by a
plugin module) or `package.module:Name`, imported when the run is built. A factory is called with
the run's Config when it has one required argument, without arguments otherwise.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable

import jax

from picotron_jax.callback import Callback
from picotron_jax.checkpoint.finite import NonFiniteGuard
from picotron_jax.checkpoint.saver import CheckpointSaver
from picotron_jax.config import Config
from picotron_jax.errors import UserError
from picotron_jax.faults import FaultInjector
from picotron_jax.generate import SampleAtEnd
from picotron_jax.observe.console import ConsoleLog, ProgressBar
from picotron_jax.observe.metrics import MetricsFile, StopOnNonFiniteLoss
from picotron_jax.observe.monitor import Monitor
from picotron_jax.observe.sinks import PrometheusSink, TensorBoardSink
from picotron_jax.observe.step_time import StepClock
from picotron_jax.train.promotion import PrecisionPromotion

REGISTRY: dict[str, Callable] = {}


def register_callback(name: str, factory: Callable) -> None:
    """Make `name` usable in `logging.callbacks`."""
    REGISTRY[name] = factory


def _factory(name: str) -> Callable:
    if name in REGISTRY:
        return REGISTRY[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        known = ", ".join(sorted(REGISTRY)) or "none yet"
        raise UserError(f"config field 'logging.callbacks' names {name!r}, which is not a registered callback "
                        f"(registered: {known}) nor 'package.module:Name'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"config field 'logging.callbacks' names {name!r}, which cannot be imported ({exc}); "
                        f"check the module path and that the package is installed") from None


def named_callback(name: str, cfg: Config) -> Callback:
    factory = _factory(name)
    try:
        required = [q for q in inspect.signature(factory).parameters.values()
                    if q.default is q.empty and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        required = []
    takes_config = len(required) == 1
    return factory(cfg) if takes_config else factory()


def build_callbacks(cfg: Config, run_dir: Path | None, extra: list | tuple = ()) -> list:
    """The run's callbacks in firing order (names are resolved first: a bad name writes nothing)."""
    named = [named_callback(name, cfg) for name in cfg.logging.callbacks]
    main = jax.process_index() == 0
    out: list = []
    if cfg.curriculum.kind == "seqlen":  # first: it replaces the batch reader the others wrap
        from picotron_jax.data.curriculum import SeqLenWarmup

        out.append(SeqLenWarmup(cfg))
    if cfg.curriculum.kind == "difficulty":  # first, as above
        from picotron_jax.data.curriculum_difficulty import DifficultyWarmup

        out.append(DifficultyWarmup(cfg))
    f = cfg.faults
    if f.in_step or f.sleep_step or f.hang_step or f.flip_step or f.slow_read_s > 0 or f.moe_collapse_step:
        out.append(FaultInjector(f, run_dir))
    if cfg.precision.mode == "fp16" and cfg.precision.promote_after > 0:
        out.append(PrecisionPromotion())
    monitor = None
    if cfg.monitor.enabled:  # detectors and actions (observe/monitor.py); they replace the plain NaN stop
        monitor = Monitor(cfg, run_dir)
        out.append(monitor)
    else:
        out.append(StopOnNonFiniteLoss())
    if cfg.data.mixture or _is_store(cfg.data.source):  # cache counters / per-source tokens into the rows
        from picotron_jax.data.stats import DataStats

        out.append(DataStats())
    # the state is checked on the device before every save; without the monitor (whose on_nan action owns
    # non-finite steps) every step's loss and gradient norm are checked too
    out.append(NonFiniteGuard(per_step=monitor is None))
    out.append(CheckpointSaver())  # before the console: the final save is reported before the summary
    if main and run_dir is not None:
        out.append(MetricsFile(run_dir / "metrics.jsonl"))
        if cfg.monitor.tensorboard:
            out.append(TensorBoardSink(run_dir / "tensorboard"))
        if cfg.monitor.plots:
            from picotron_jax.observe.plots import PlotsAtEnd  # matplotlib only when asked for

            out.append(PlotsAtEnd(run_dir))
    if main and cfg.monitor.prometheus_port:
        out.append(PrometheusSink(cfg.monitor.prometheus_port, monitor))
    if main and cfg.monitor.dashboard_port and run_dir is not None:
        from picotron_jax.observe.dashboard import DashboardDuringRun

        out.append(DashboardDuringRun(run_dir, cfg.monitor.dashboard_port))
    if main:
        out.append(ConsoleLog())
        if cfg.logging.progress:
            out.append(ProgressBar())
    if cfg.generate.prompt:
        out.append(SampleAtEnd())
    if cfg.profile.start_step:  # a profiling window (picotron_jax/profile); imported only when asked for
        from picotron_jax.profile.window import ProfiledWindow

        out.append(ProfiledWindow(cfg, run_dir))
    d = cfg.debug
    if run_dir is not None or d.break_when or d.check_every or d.nan_origin or jax.process_count() > 1:
        from picotron_jax.debug.callbacks import debug_callbacks  # picotron_jax/debug: the debugger

        first, last = debug_callbacks(cfg, run_dir)
        out = first + out + last
    out = out + named + list(extra)
    if cfg.monitor.enabled:  # the step-time split and goodput (observe/step_time.py): stamps around all the others
        clock = StepClock(run_dir)
        out = [clock.first, *out, clock.last]
    return out


def _is_store(source: str) -> bool:
    from picotron_jax.data.store import is_store

    return is_store(source)
