"""`picotron-jax tune layout`: the fastest layout that fits, by compile-only search and short trials.

1. Enumerate layouts (space.py) and drop those the config validation rejects.
2. Compile each survivor's train step for abstract inputs (memory/estimate.py: nothing runs) for
   its exact per-device peak memory, matmul FLOPs and collective bytes per mesh axis; over the
   budget -> out. Compile results are cached on disk by (config, layout, devices, JAX version).
3. Rank the rest by the analytic step time (cost.py).
4. Run the best-ranked few for real (bench.py's `bench_step`, a handful of steps) within the time
   budget; the fastest measured one is chosen (the best predicted one when nothing is measured).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax

from picotron_jax.config import Config, save_config
from picotron_jax.memory.estimate import compile_train_step, estimate_from_compiled, mib
from picotron_jax.tune.cost import Collectives, Hardware, collectives_by_axes, pipeline_shares, predict_step
from picotron_jax.tune.space import Layout, apply
from picotron_jax.tune.work import thunk_work

DEFAULT_CACHE = Path.home() / ".cache" / "picotron_jax" / "tune"
CACHE_VERSION = 2  # bumped when compile_candidate's result gains fields (2: thunk work, collective copy bytes)


@dataclass
class Result:
    layout: Layout
    compiled: dict[str, Any]  # peak_bytes, flops, collectives, bubble, ... (what the cache holds)
    cached: bool
    fits: bool = True
    predicted: dict[str, float] = field(default_factory=dict)
    measured_step_s: float | None = None
    measured_tokens_per_s: float | None = None
    measured_cpu_s: float | None = None  # the process's CPU seconds per step (all its threads)
    error: str = ""

    def as_dict(self, num_devices: int) -> dict[str, Any]:
        return {"label": self.layout.label(), "layout": self.layout.as_dict(),
                "overrides": self.layout.overrides() + [f"mesh.num_devices={num_devices}"],
                "fits": self.fits, "peak_bytes": self.compiled.get("peak_bytes"),
                "predicted_step_s": self.predicted.get("step_s"), "predicted": self.predicted,
                "measured_step_s": self.measured_step_s, "measured_tokens_per_s": self.measured_tokens_per_s,
                "measured_cpu_s": self.measured_cpu_s,
                "cached": self.cached, "error": self.error, "compiled": self.compiled}


def cache_key(cfg: Config, devices: list) -> str:
    blob = json.dumps({"cfg": cfg.to_dict(), "result": CACHE_VERSION, "devices": len(devices), "platform": devices[0].platform,
                       "kind": devices[0].device_kind, "jax": jax.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compile_candidate(cfg: Config, devices: list, keep: dict | None = None) -> dict[str, Any]:
    """Compile only: exact per-device memory, FLOPs, collectives per axis set, pipeline bubble.
    `keep`: the executable is stored there under the cache key (a measured trial reuses it)."""
    t0 = time.perf_counter()
    compiled, rules, setup, flops = compile_train_step(cfg, devices)
    est = estimate_from_compiled(cfg, compiled, rules, setup, flops)
    mesh_shape = tuple(rules.mesh.devices.shape)
    text = compiled.as_text()
    coll = collectives_by_axes(text, mesh_shape)
    bubble, busy_share = 0.0, 1.0
    if rules.mesh.shape["pipe"] > 1:
        from picotron_jax.parallel.pipeline_schedule import schedule_of_config

        bubble, busy_share = pipeline_shares(schedule_of_config(cfg, rules.mesh.shape["pipe"]))
    if keep is not None:
        keep[cache_key(cfg, devices)] = compiled
    return {"peak_bytes": est.peak_bytes, "params_bytes": est.params_bytes, "opt_state_bytes": est.opt_state_bytes,
            "temp_bytes": est.temp_bytes, "flops": est.flops, "collective_bytes": coll.bytes_by_axes,
            "collective_counts": coll.count_by_axes, "collective_copy_bytes": coll.copy_bytes,
            **thunk_work(text), "bubble": bubble, "busy_share": busy_share,
            "compile_s": time.perf_counter() - t0}


def compile_cached(cfg: Config, devices: list, cache_dir: Path | None,
                   keep: dict | None = None) -> tuple[dict[str, Any], bool]:
    """(compile result, whether it came from the cache)."""
    path = cache_dir / f"{cache_key(cfg, devices)}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text()), True
        except ValueError:
            pass
    out = compile_candidate(cfg, devices, keep)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
    return out, False


def measure(cfg: Config, steps: int, warmup: int, compiled: Any = None) -> dict[str, Any]:
    """A few real steps of this layout (bench.py), on the first mesh.num_devices devices; `compiled`: the
    executable of the compile-only pass, when this process made it."""
    from picotron_jax.bench import bench_step

    return bench_step(cfg.with_overrides([f"bench.steps={steps}", f"bench.warmup={warmup}"]), compiled)


def predict(compiled: dict[str, Any], hw: Hardware) -> dict[str, float]:
    """The step-time model (cost.py) for one compile result."""
    coll = Collectives(compiled["collective_bytes"], compiled["collective_counts"],
                       compiled.get("collective_copy_bytes", 0))
    work = {k: compiled.get(k, 0) for k in ("thunks", "thunk_bytes")}
    return predict_step(compiled["flops"], coll, compiled["bubble"], hw, compiled.get("busy_share", 1.0), work)


def search(cfg: Config, devices: list, layouts: list[Layout], hw: Hardware, *, budget: float = math.inf,
           top: int = 3, time_budget: float = math.inf, steps: int = 3, warmup: int = 1, calibrate: int = 0,
           objective: str = "wall", calibration: dict | None = None, cache_dir: Path | None = DEFAULT_CACHE,
           log: Callable[[str], None] | None = None) -> list[Result]:
    """Compile, rank and measure; returns the results fastest-predicted first (over-budget ones last).
    `calibrate` > 0: first measure that many layouts spread over the model's terms, fit the model's
    rates to them (calibrate.py), re-rank with the fitted rates, then measure the `top` best not yet
    measured (fitted to `objective`'s figure, see `measured_cost`); `calibration` (a dict, when given)
    receives the fitted hardware, factors and layouts."""
    log = log or (lambda s: None)
    n = len(devices)
    results, executables = [], {}
    for i, layout in enumerate(layouts):
        lcfg = apply(cfg, layout, n)
        try:
            compiled, cached = compile_cached(lcfg, devices, cache_dir, executables)
        except Exception as exc:  # noqa: BLE001 - a candidate the compiler refuses is reported, not fatal
            results.append(Result(layout, {}, False, fits=False, error=f"compile: {type(exc).__name__}: {exc}"))
            log(f"[{i + 1}/{len(layouts)}] {layout.label()}: compile failed: {exc}")
            continue
        r = Result(layout, compiled, cached, fits=compiled["peak_bytes"] <= budget, predicted=predict(compiled, hw))
        results.append(r)
        log(f"[{i + 1}/{len(layouts)}] {layout.label()}: peak {mib(compiled['peak_bytes'])}"
            f"{' (cached)' if cached else ''}, predicted {r.predicted['step_s'] * 1e3:.1f} ms"
            f"{'' if r.fits else ', over budget'}")

    def rank() -> None:
        results.sort(key=lambda r: (not r.fits or bool(r.error), r.predicted.get("step_s", math.inf)))

    t0 = time.perf_counter()

    def run(r: Result) -> bool:
        """Measure `r` unless the time budget is spent (False then)."""
        if time.perf_counter() - t0 > time_budget:
            log(f"time budget {time_budget:.0f} s spent: {r.layout.label()} and later not measured")
            return False
        try:
            lcfg = apply(cfg, r.layout, n)
            b = measure(lcfg, steps, warmup, executables.get(cache_key(lcfg, devices)))
        except Exception as exc:  # noqa: BLE001 - a failed trial is reported with its error
            r.error = f"measure: {type(exc).__name__}: {exc}"
            log(f"measure {r.layout.label()}: failed: {exc}")
            return True
        r.measured_step_s, r.measured_tokens_per_s, r.measured_cpu_s = b["step_s"], b["tokens_per_s"], b.get("cpu_s")
        log(f"measured {r.layout.label()}: {b['step_s'] * 1e3:.1f} ms/step, {b['tokens_per_s']:,.0f} tokens/s "
            f"(predicted {r.predicted['step_s'] * 1e3:.1f} ms)")
        return True

    rank()
    usable = [r for r in results if r.fits and not r.error]
    if calibrate > 0 and len(usable) > calibrate:
        from picotron_jax.tune.calibrate import TERMS, calibrated, fit_scales, spread_picks

        picked = [usable[i] for i in spread_picks([r.predicted for r in usable], calibrate)]
        for r in picked:
            if not run(r):
                break
        done = [r for r in picked if measured_cost(r, objective) is not None]
        if done:
            scales = fit_scales([r.predicted for r in done], [measured_cost(r, objective) for r in done])
            hw = calibrated(hw, scales)
            for r in results:
                if r.compiled:
                    r.predicted = predict(r.compiled, hw)
            if calibration is not None:
                calibration.update(hardware=hw, factors=dict(zip([k for k, _ in TERMS], map(float, scales))),
                                   layouts=[r.layout.label() for r in done])
            log(f"calibrated on {len(done)} layouts: {hw.source}")
            rank()
    for r in [r for r in results if r.fits and not r.error and r.measured_step_s is None][:top]:
        if not run(r):
            break
    return results


def measured_cost(r: Result, objective: str = "wall") -> float | None:
    """The measured figure the search minimises: wall seconds per step, or with objective "cpu" the
    process's CPU seconds per step (on a host shared with other users' work the wall time says how much
    of the cores the trial got; the CPU seconds say how much work its step is)."""
    return r.measured_cpu_s if objective == "cpu" else r.measured_step_s


def choose(results: list[Result], objective: str = "wall") -> Result | None:
    """The fastest measured candidate; without measurements the best predicted one that fits."""
    measured = [r for r in results if measured_cost(r, objective) is not None]
    if measured:
        return min(measured, key=lambda r: measured_cost(r, objective))
    return next((r for r in results if r.fits and not r.error), None)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (ties by average rank); None for fewer than 3 pairs."""
    if len(xs) < 3:
        return None
    import numpy as np

    def ranks(v: list[float]) -> np.ndarray:
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for x in np.unique(v):  # ties share their average rank
            r[v == x] = r[v == x].mean()
        return r

    rx, ry = ranks(xs), ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def report(results: list[Result], chosen: Result | None, num_devices: int, hw: Hardware, budget: float,
           rejected: int) -> dict[str, Any]:
    measured = [r for r in results if r.measured_step_s is not None]
    return {"devices": num_devices, "hardware": hw.as_dict(),
            "memory_budget_bytes": None if math.isinf(budget) else int(budget),
            "rejected_by_validation": rejected, "compiled": len(results),
            "over_budget": sum(1 for r in results if not r.fits and not r.error),
            "measured": len(measured),
            "spearman_predicted_measured": spearman([r.predicted["step_s"] for r in measured],
                                                    [r.measured_step_s for r in measured]),
            "spearman_predicted_cpu": spearman([r.predicted["step_s"] for r in measured if r.measured_cpu_s],
                                               [r.measured_cpu_s for r in measured if r.measured_cpu_s]),
            "chosen": None if chosen is None else chosen.as_dict(num_devices),
            "candidates": [r.as_dict(num_devices) for r in results]}


def format_report(results: list[Result], chosen: Result | None, budget: float) -> str:
    lines = [f"{'rank':>4}  {'layout':<44} {'peak':>12} {'fits':>4} {'predicted':>11} {'measured':>11} {'cpu':>8}"]
    for i, r in enumerate(results):
        pred = f"{r.predicted['step_s'] * 1e3:.1f} ms" if r.predicted else "-"
        meas = f"{r.measured_step_s * 1e3:.1f} ms" if r.measured_step_s is not None else "-"
        cpu = f"{r.measured_cpu_s:.2f} s" if r.measured_cpu_s is not None else "-"
        peak = mib(r.compiled["peak_bytes"]) if r.compiled else "-"
        mark = "  <- chosen" if r is chosen else (f"  {r.error[:60]}" if r.error else "")
        lines.append(f"{i + 1:>4}  {r.layout.label():<44} {peak:>12} {'yes' if r.fits else 'no':>4} {pred:>11} "
                     f"{meas:>11} {cpu:>8}{mark}")
    if chosen is None:
        lines.append("no candidate fits the memory budget" + ("" if math.isinf(budget) else f" {mib(budget)}"))
    return "\n".join(lines)


def write_preset(cfg: Config, chosen: Result, num_devices: int, path: str | Path) -> Path:
    """The chosen layout as a complete config YAML that `picotron-jax train --config` runs as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(apply(cfg, chosen.layout, num_devices), path)
    how = (f"measured {chosen.measured_step_s * 1e3:.1f} ms/step" if chosen.measured_step_s is not None
           else "predicted, not measured")
    head = (f"# picotron-jax tune layout: {chosen.layout.label()} on {num_devices} devices, "
            f"peak {mib(chosen.compiled['peak_bytes'])} per device, {how}\n")
    path.write_text(head + path.read_text())
    return path
