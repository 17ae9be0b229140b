"""From a captured window to numbers: where each step's time, FLOPs, memory and bytes go.

Inputs are the capture's files (capture.py): the trace, `program.hlo.txt` and `window.json`. The
time split is the mean over devices of each device's timeline (timeline.py), per step; it sums to
the window's length on the trace's clock, which is compared with the loop's wall clock
(`step_s`, what the user waits for). Modules are the named scopes of the model (program.py):
their static FLOPs (XLA's count, summing to cost_analysis), the FLOPs their executions did in
the window, their op time and achieved FLOP/s against the device's peak, split into forward,
backward, recomputation and update (Holistic Trace Analysis' kernel breakdown, the DeepSpeed flops
profiler's per-module view, MaxText's MFU accounting).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from picotron_jax.config import MESH_AXES, Config
from picotron_jax.profile.capture import READ_BATCH, STEP
from picotron_jax.profile.program import MODULES, Program, build_program
from picotron_jax.profile.timeline import CATEGORIES, COLLECTIVE_KINDS, Window, device_timelines, find_window
from picotron_jax.profile.trace import load_trace


def analyse(out_dir: str | Path, cfg: Config) -> dict:
    out = Path(out_dir)
    meta = json.loads((out / "window.json").read_text())
    program = build_program((out / "program.hlo.txt").read_text(), tuple(meta["mesh_shape"]))
    trace = load_trace(out / "trace")
    window = find_window(trace, STEP, READ_BATCH)
    timelines = device_timelines(trace, program, window)
    n = window.steps
    ids = meta["mesh_device_ids"]
    devices = [timelines[d] for d in ids if d in timelines]
    if not devices:
        raise ValueError(f"no XLA op events of the train step's devices in {trace.source}")

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else 0.0

    breakdown = {c: mean(t.seconds.get(c, 0.0) for t in devices) / n for c in CATEGORIES}
    breakdown = {c: v for c, v in breakdown.items() if v > 0 or c in ("compute", "data", "host", "idle")}
    per_device = []
    for t in devices:
        pos = ids.index(t.device)
        coords = dict(zip(MESH_AXES, (int(i) for i in np.unravel_index(pos, meta["mesh_shape"]))))
        comm = sum(t.seconds.get(k, 0.0) for k in COLLECTIVE_KINDS + ("other-collective",))
        per_device.append({"device": t.device, "coords": coords, "compute_s": t.seconds.get("compute", 0.0) / n,
                           "collective_s": comm / n, "wait_s": t.seconds.get("collective_wait", 0.0) / n,
                           "host_callback_s": t.seconds.get("host_callback", 0.0) / n,
                           "idle_s": sum(t.seconds.get(k, 0.0) for k in ("runtime", "data", "host", "idle")) / n})
    comm_time = sum(sum(t.collective_time.values()) for t in devices)
    peak_total = meta.get("peak_flops_total", float("nan"))
    shared = meta["platform"] == "cpu"  # virtual CPU devices share the host: one alone may use all of it
    peak_device = peak_total if shared else peak_total / meta["num_devices"]
    busy = sum(t.seconds.get("compute", 0.0) for t in devices) / window.seconds
    slots = meta["num_devices"] if meta["platform"] != "cpu" else min(meta["num_devices"], meta["host_cores"])
    report = {
        "config": {"mesh": meta["mesh"], "platform": meta["platform"], "device_kind": meta["device_kind"],
                   "num_devices": meta["num_devices"], "host_cores": meta["host_cores"],
                   "tokens_per_step": meta["tokens_per_step"], "remat": cfg.memory.remat,
                   "zero_stage": cfg.train.zero_stage, "global_batch": cfg.train.global_batch,
                   "seq_len": cfg.train.seq_len, "pipeline": cfg.pipeline.schedule if cfg.mesh.pipe > 1 else "none"},
        "steps": n, "first_step": meta["start_step"],
        "step_s": meta["step_s"],
        "trace_step_s": window.seconds / n,
        "breakdown": breakdown,
        "breakdown_share": {c: v / (window.seconds / n) for c, v in breakdown.items()},
        **_per_step_shares(trace, program, window, ids, breakdown),
        "devices": per_device,
        "overlap": (sum(t.overlap for t in devices) / comm_time) if comm_time else None,
        "machine": {"slots": slots, "busy_devices": busy, "spare": max(0.0, min(1.0, 1.0 - busy / slots)),
                    "peak_flops_total": peak_total, "peak_flops_device": peak_device,
                    "shared_cores": meta["platform"] == "cpu" and meta["num_devices"] > meta["host_cores"]},
        "collectives": _collectives(program, devices, n),
        "modules": _modules(program, devices, n, peak_device),
        "flops": {"cost_analysis": meta["cost_flops"], "modules_sum": program.static_flops(),
                  "executed_per_device": mean(_executed(program, t) for t in devices) / n},
        "memory": _memory(meta, program),
        "pipeline": _pipeline(cfg, program, devices, meta),
        "moe": _moe(meta, cfg, devices, n),
        "data": {"wait_s": breakdown.get("data", 0.0),
                 "read_s": sum(b - a for a, b in window.reads) / n, "reads": len(window.reads)},
        "host": {"host_s": breakdown.get("host", 0.0), "runtime_s": breakdown.get("runtime", 0.0),
                 "logging_every": cfg.logging.every, "progress": cfg.logging.progress},
        "gpu_only": _gpu_only(meta),
        "trace": {"dir": str(out / "trace"), "file": trace.source, "events": len(trace.events)},
    }
    report["straggler"] = _straggler(per_device, report["trace_step_s"])
    return report


def _per_step_shares(trace, program: Program, window: Window, ids: list[int], breakdown: dict) -> dict:
    """Each step's own split (from its start to the next step's start, mean over devices, as shares of that
    step), then per category the median over the window's steps and its range (max - min): one step the
    shared host disturbed moves the mean of a short window, not its median (breakdown_share_median)."""
    starts = [a for a, _ in window.step_spans] + [window.end]
    rows = []
    for i in range(window.steps):
        lo, hi = starts[i], starts[i + 1]
        one = Window(lo, hi, 1, [window.step_spans[i]], [b for b in window.between if lo <= b[0] < hi],
                     [r for r in window.reads if lo <= r[0] < hi])
        timelines = device_timelines(trace, program, one)
        devices = [timelines[d] for d in ids if d in timelines]
        if devices and one.seconds > 0:
            rows.append({c: sum(t.seconds.get(c, 0.0) for t in devices) / len(devices) / one.seconds
                         for c in breakdown})
    if not rows:
        return {}
    return {"breakdown_share_median": {c: statistics.median(r[c] for r in rows) for c in breakdown},
            "breakdown_share_range": {c: max(r[c] for r in rows) - min(r[c] for r in rows) for c in breakdown}}


def _executed(program: Program, t) -> float:
    return sum(program.ops[name].flops * runs for name, runs in t.op_runs.items() if not program.ops[name].control)


def _collectives(program: Program, devices, n: int) -> list[dict]:
    rows: dict[tuple[str, tuple], dict] = {}
    for t in devices:
        for name, runs in t.op_runs.items():
            op = program.ops[name]
            if not op.collective:
                continue
            row = rows.setdefault((op.collective, op.axes), {"kind": op.collective, "axes": list(op.axes) or ["none"],
                                                            "bytes": 0.0, "count": 0.0, "time_s": 0.0})
            row["bytes"] += op.collective_bytes * runs
            row["count"] += runs
            row["time_s"] += t.op_time.get(name, 0.0)
    out = []
    k = len(devices) * n
    for (kind, axes), row in rows.items():
        waits = [t.wait_by_kind.get(kind, 0.0) for t in devices]
        row = {**row, "bytes": row["bytes"] / k, "count": row["count"] / k, "time_s": row["time_s"] / k}
        row["wait_s"] = sum(waits) / k * (row["time_s"] * k / max(sum(t.collective_time.get(kind, 0.0)
                                                                          for t in devices), 1e-12))
        moving = max(row["time_s"] - row["wait_s"], 0.0)
        row["bandwidth_gbps"] = row["bytes"] / moving / 1e9 if moving > 0 and row["bytes"] else None
        out.append(row)
    return sorted(out, key=lambda r: -r["time_s"])


def _modules(program: Program, devices, n: int, peak_device: float) -> list[dict]:
    rows = {m: {"module": m, "time_s": 0.0, "flops": 0.0, "static_flops": 0.0, "forward_s": 0.0, "backward_s": 0.0,
                "recompute_s": 0.0, "update_s": 0.0, "collective_s": 0.0} for m in MODULES}
    for m, f in program.module_static_flops().items():
        rows[m]["static_flops"] = f
    k = len(devices) * n
    for t in devices:
        for name, runs in t.op_runs.items():
            op = program.ops[name]
            if op.control:
                continue
            row = rows[op.module]
            time = t.op_time.get(name, 0.0) / k
            if op.collective:
                row["collective_s"] += time
                continue
            row["time_s"] += time
            row[f"{op.phase}_s"] += time
            row["flops"] += op.flops * runs / k
    out = []
    for row in rows.values():
        if not row["time_s"] and not row["static_flops"] and not row["collective_s"]:
            continue
        row["flops_per_s"] = row["flops"] / row["time_s"] if row["time_s"] else None
        row["peak_fraction"] = (row["flops_per_s"] / peak_device if row["flops_per_s"] and peak_device == peak_device
                                else None)
        out.append(row)
    return sorted(out, key=lambda r: -r["time_s"])


def _memory(meta: dict, program: Program) -> dict:
    m = dict(meta["memory"])
    largest = sorted((o for o in program.ops.values() if not o.control), key=lambda o: -o.out_bytes)[:5]
    m["largest_buffers"] = [{"op": o.name, "bytes": o.out_bytes, "module": o.module, "phase": o.phase,
                             "op_name": o.op_name} for o in largest]
    stats = meta.get("device_memory_stats") or {}
    if stats.get("bytes_limit"):
        free = max(stats["bytes_limit"] - stats.get("bytes_in_use", 0), 1)
        m["allocator"] = {**stats, "fragmentation": 1.0 - min(stats.get("largest_free_block_bytes", free) / free, 1.0)}
    else:
        m["allocator"] = None  # XLA:CPU reports no allocator statistics
    m["limit_bytes"] = stats.get("bytes_limit") or meta.get("host_memory_per_device")
    return m


def _pipeline(cfg: Config, program: Program, devices, meta: dict) -> dict | None:
    pipe = meta["mesh_shape"][MESH_AXES.index("pipe")]
    if pipe == 1:
        return None
    from picotron_jax.parallel.pipeline_schedule import schedule_of_config

    sched = schedule_of_config(cfg, pipe)
    loops = [o for o in program.ops.values() if o.opcode == "while" and o.trip == sched.num_slots]
    out = {"schedule": sched.kind, "p": sched.p, "m": sched.m, "v": sched.v, "slots": sched.num_slots,
           "bubble_analytic": sched.analytic_bubble_fraction(), "bubble_counted": sched.bubble_fraction(),
           "bubble_measured": None, "loop_share": None}
    if not loops:
        return out
    name = max(loops, key=lambda o: sum(t.loop_time.get(o.name, 0.0) for t in devices)).name
    timed = [t for t in devices if t.loop_time.get(name)]
    if not timed:
        return out
    n = meta["steps"]
    loop_s = statistics.mean(t.loop_time[name] for t in timed) / n
    # the bubble as the ranks live it: waiting in the loop's exchanges for a neighbour that still computes
    out["bubble_measured"] = statistics.mean(t.loop_wait.get(name, 0.0) / t.loop_time[name] for t in timed)
    out["loop_share"] = loop_s / (meta["wall_s"] / n)
    out["loop_s"] = loop_s
    out["compute_per_op_s"] = statistics.mean(t.loop_compute.get(name, 0.0) for t in timed) / n / (2 * sched.m * sched.v)
    out["transfer_per_slot_s"] = max(statistics.mean(t.loop_transfer.get(name, 0.0) for t in timed) / n, 0.0) / \
        sched.num_slots
    return out


def _moe(meta: dict, cfg: Config, devices, n: int) -> dict | None:
    if not cfg.moe.enabled or not meta.get("moe_loads"):
        return None
    loads = np.asarray(meta["moe_loads"], np.float64)  # [steps, L_moe, E]
    if loads.ndim == 2:
        loads = loads[:, None, :]
    mean_e = loads.mean(axis=-1, keepdims=True)
    ratio = (loads.max(axis=-1) / np.maximum(mean_e[..., 0], 1e-9)).mean(axis=0)
    cv = (loads.std(axis=-1) / np.maximum(mean_e[..., 0], 1e-9)).mean(axis=0)
    T, K, E = cfg.train.seq_len, cfg.moe.top_k, cfg.moe.num_experts
    dropped = None
    if cfg.moe.dispatch == "capacity":
        from picotron_jax.models.moe import expert_capacity

        C = expert_capacity(T, K, E, cfg.moe.capacity_factor)
        # per sequence at most C copies per expert: an upper bound on what is kept, from the step's loads
        kept = np.minimum(loads, C * cfg.train.global_batch).sum(axis=-1)
        dropped = float(1.0 - (kept / loads.sum(axis=-1)).mean())
    a2a_wait = statistics.mean(t.wait_by_kind.get("all-to-all", 0.0) for t in devices) / n
    return {"experts": E, "top_k": K, "dispatch": cfg.moe.dispatch,
            "load_max_over_mean": [float(x) for x in ratio], "load_cv": [float(x) for x in cv],
            "mean_load_max_over_mean": float(ratio.mean()), "dropped_fraction_bound": dropped,
            "load_per_expert": loads.mean(axis=0).tolist(), "all_to_all_wait_s": a2a_wait}


def _straggler(per_device: list[dict], step: float) -> dict | None:
    """One device waiting far less than the others in collectives: the others wait for it."""
    if len(per_device) < 2:
        return None
    waits = sorted(per_device, key=lambda r: r["wait_s"])
    least, rest = waits[0], waits[1:]
    others = statistics.median(r["wait_s"] for r in rest)
    if others < 0.15 * step or least["wait_s"] > 0.15 * others:  # strict: shared CPUs make waits uneven anyway
        return None
    return {"device": least["device"], "coords": least["coords"], "wait_s": least["wait_s"],
            "others_wait_s": others}


def _gpu_only(meta: dict) -> dict:
    if meta["platform"] == "cpu":
        why = "absent on CPU (XLA:CPU runs collectives as rendezvous between threads; no kernels, no NCCL)"
        return {"kernel_overlap": why, "nccl_bandwidth": why}
    return {"kernel_overlap": "from the device streams' op events (overlap above)",
            "nccl_bandwidth": "from collective op events (collectives above)"}


def finite(x) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else 0.0
