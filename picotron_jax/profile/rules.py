"""Bottleneck rules: each reads the measured numbers and, where it fires, names the bottleneck, proposes
a config change and estimates what it gains, from those numbers. Findings are ranked by gain.

A finding: `kind`, `title`, `evidence` (the numbers that fired it), `suggestion` (a list of
`section.key=value` overrides, checked by config validation; empty when no setting fixes it),
`estimated_gain` (share of the step's time the change saves, per token where it changes the batch,
as if every device were its own chip) and `estimated_gain_here` (on this machine: where virtual
CPU devices share the host's cores, time a device spends *waiting* is used by the others, so
removing waits gains at most the host's spare capacity; removing *work* gains in full).

Gain formulas: pipeline bubble, step ~ W / (1 - b) at fixed work W, so moving the bubble from b to
b' saves 1 - (1 - b) / (1 - b') of the pipeline loop (b measured from the trace, b' scaled by the
schedule's analytic bubbles, Narayanan et al. 2021); recomputation, its op time (on XLA:CPU calibrated by timing the suggestion, and withheld when it
measures no gain); a larger microbatch (half the accumulation), half the program's runtime between
ops; ZeRO-1, the
optimizer update's time times (1 - 1/data) (Rajbhandari et al. 2020); a per-device batch k times
larger, per-token time from (fixed + k x work) / k with the measured fixed part; exposed
tensor-parallel collectives, half their time when the tensor axis halves; a straggler, the others'
wait; data wait, the wait; capacity drops, the dropped share of token copies (work redone to see
as many tokens through the experts).
"""

from __future__ import annotations

import jax

from picotron_jax.config import Config, resolve_mesh_shape
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError



def _valid(cfg: Config, overrides: list[str], num_devices: int) -> bool:
    try:
        validate(cfg.with_overrides(overrides), num_devices)
    except UserError:
        return False
    return True


def _finding(kind, title, evidence, suggestion, gain, step, spare=None, numbers=None) -> dict:
    gain = max(0.0, min(1.0, gain))
    here = gain if spare is None else min(gain, spare)
    return {"kind": kind, "title": title, "evidence": evidence, "suggestion": suggestion,
            "estimated_gain": round(gain, 4), "estimated_gain_s": round(gain * step, 6),
            "estimated_gain_here": round(here, 4), "gain_kind": "wait" if spare is not None else "work",
            "numbers": numbers or {}}


def find_bottlenecks(report: dict, cfg: Config, num_devices: int, devices=None) -> list[dict]:
    step = report["trace_step_s"]
    share = report["breakdown_share"]
    spare = report["machine"]["spare"]
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    out = []
    for rule in (_straggler, _bubble, _tensor_collectives, _data_wait, _moe, _remat, _optimizer, _small_batch,
                 _larger_microbatch, _host):
        found = rule(report, cfg, sizes, step, share, spare, num_devices, devices)
        if found:
            out.append(found)
    from picotron_jax.profile.memory_rule import memory_pressure

    fits = memory_pressure(report, cfg, num_devices, devices)
    # a run over its memory budget must fit first; speed findings follow by estimated gain
    return ([fits] if fits else []) + sorted(out, key=lambda f: -f["estimated_gain"])


def _straggler(report, cfg, sizes, step, share, spare, n, devices):
    s = report.get("straggler")
    if not s:
        return None
    where = ", ".join(f"{a}={i}" for a, i in s["coords"].items() if sizes[a] > 1)
    return _finding(
        "straggler", f"device {s['device']} ({where}) is the straggler",
        f"device {s['device']} waits {s['wait_s'] * 1e3:.1f} ms per step in collectives, the other devices "
        f"{s['others_wait_s'] * 1e3:.1f} ms (median): they wait for it at every rendezvous. Check that device "
        f"(or its process: host load, data loader, clocks); no setting of this run fixes it",
        [], s["others_wait_s"] / step, step, spare,
        {"device": s["device"], "wait_s": s["wait_s"], "others_wait_s": s["others_wait_s"]})


def _bubble(report, cfg, sizes, step, share, spare, n, devices):
    p = report.get("pipeline")
    if not p or p["bubble_measured"] is None or p["bubble_measured"] < 0.1:
        return None
    from picotron_jax.parallel.pipeline_schedule import build_schedule

    b, m = p["bubble_measured"], p["m"]
    best = None
    for m_new in (4 * m, 2 * m):
        over = [f"pipeline.microbatches={m_new}"]
        if not _valid(cfg, over, n):
            continue
        sched = build_schedule(p["schedule"], p["p"], m_new, p["v"])
        b_new = b * sched.analytic_bubble_fraction() / p["bubble_analytic"]
        # loop time = slots x (one op's compute + one slot's exchange): ops shrink with m, slots grow with m
        u, q = p["compute_per_op_s"], p["transfer_per_slot_s"]
        model_now = p["slots"] * (u + q) / max(1.0 - b, 1e-6)
        model_new = sched.num_slots * (u * m / m_new + q) / max(1.0 - b_new, 1e-6)
        gain = p["loop_s"] * (1.0 - model_new / model_now) / step
        best = (over, m_new, b_new, gain)
        break
    if best is None or best[3] <= 0:
        return None
    over, m_new, b_new, gain = best
    return _finding(
        "pipeline_bubble", f"pipeline bubble: ranks idle {b:.0%} of the pipeline loop",
        f"{p['schedule']} with p={p['p']}, m={m}: measured bubble {b:.1%} of the loop (ranks waiting for their "
        f"neighbours), analytic {p['bubble_analytic']:.1%}; with m={m_new} the analytic bubble is "
        f"{p['bubble_analytic'] * b_new / b:.1%}", over, gain, step, spare,
        {"bubble_measured": b, "bubble_analytic": p["bubble_analytic"], "bubble_new": b_new})


def _tensor_collectives(report, cfg, sizes, step, share, spare, n, devices):
    t = sizes["tensor"]
    if t < 2:
        return None
    rows = [r for r in report["collectives"] if "tensor" in r["axes"]]
    time = sum(r["time_s"] for r in rows)
    overlap = report.get("overlap") or 0.0
    exposed = time * (1.0 - overlap)
    if exposed < 0.1 * step:
        return None
    over = [f"mesh.tensor={t // 2}", f"mesh.data={sizes['data'] * 2}"]
    if not _valid(cfg, over, n):
        return None
    return _finding(
        "tensor_collectives", f"exposed tensor-parallel collectives: {exposed / step:.0%} of the step",
        f"collectives over the tensor axis take {time * 1e3:.1f} ms per step, {overlap:.0%} of it hidden under "
        f"compute; halving mesh.tensor halves them (data parallelism's gradient all-reduce grows less)",
        over, 0.5 * exposed / step, step, spare, {"tensor_collective_s": time, "overlap": overlap})


def _data_wait(report, cfg, sizes, step, share, spare, n, devices):
    wait = report["data"]["wait_s"]
    if wait < 0.05 * step:
        return None
    return _finding(
        "data_wait", f"waiting for data: {wait / step:.0%} of the step",
        f"the loop waits {wait * 1e3:.1f} ms per step for its next batch; a batch read takes "
        f"{report['data']['read_s'] * 1e3:.1f} ms on the loader thread against a step of {step * 1e3:.1f} ms. "
        f"The loader reads one batch ahead on one thread (data/loader.py), which no setting changes yet: make "
        f"the source faster (local disk, pre-tokenised cache, data.cache_dir on fast storage)",
        [], wait / step, step, spare, {"data_wait_s": wait, "read_s": report["data"]["read_s"]})


def _moe(report, cfg, sizes, step, share, spare, n, devices):
    moe = report.get("moe")
    if not moe or moe["mean_load_max_over_mean"] < 1.5:
        return None
    ratio = moe["mean_load_max_over_mean"]
    if cfg.moe.bias_update_rate == 0:
        over = ["moe.bias_update_rate=0.001"]
    else:
        over = [f"moe.aux_loss={max(cfg.moe.aux_loss * 10, 0.01):g}"]
    wait = moe["all_to_all_wait_s"]
    dropped = moe["dropped_fraction_bound"] or 0.0
    gain, kind = (dropped, "work") if moe["dispatch"] == "capacity" else (wait / step, "wait")
    f = _finding(
        "moe_imbalance", f"MoE router imbalance: the busiest expert gets {ratio:.1f}x the mean load",
        f"token copies per expert max/mean {ratio:.2f} (1.0 = balanced; {moe['experts'] / moe['top_k']:.0f} = all "
        f"tokens on top_k experts); " + (f"capacity dispatch drops up to {dropped:.0%} of the copies"
                                         if moe["dispatch"] == "capacity" else
                                         f"the expert-parallel all-to-all waits {wait * 1e3:.1f} ms per step for the "
                                         f"busiest rank"), over, gain, step, spare if kind == "wait" else None,
        {"load_max_over_mean": ratio, "dropped_fraction_bound": dropped, "all_to_all_wait_s": wait})
    return f


def _remat(report, cfg, sizes, step, share, spare, n, devices):
    if cfg.memory.remat == "none":
        return None
    recompute = sum(m["recompute_s"] for m in report["modules"])
    if recompute < 0.03 * step:
        return None
    from picotron_jax.profile.memory_rule import memory_budget

    limit = memory_budget(cfg, report)
    over = ["memory.remat=none"]
    if not _valid(cfg, over, n) or not limit:
        return None
    peak_now = report["memory"]["peak_bytes"]
    peak_new = None
    if devices is not None:
        from picotron_jax.memory.estimate import estimate_memory

        peak_new = estimate_memory(cfg.with_overrides(over), devices).peak_bytes
        if peak_new > 0.8 * limit:
            return None
    estimate, measured = recompute / step, None
    # one process only: processes whose traces differ could disagree on timing, and the timing builds programs
    if report["config"]["platform"] == "cpu" and jax.process_count() == 1:
        measured = _measured_remat_gain(cfg, over, estimate)
        if measured <= 0:  # XLA:CPU's cost of keeping the activations outweighs the recomputation saved
            report.setdefault("withheld", []).append({
                "kind": "remat_recompute", "suggestion": over, "estimated_gain": round(estimate, 4),
                "measured_gain": round(measured, 4),
                "reason": f"recomputation is {estimate:.0%} of the step, but {' '.join(over)} measured "
                          f"{-measured:.0%} slower on this backend (alternating timed steps), so it is not proposed"})
            return None
    found = _finding(
        "remat_recompute", f"recomputation with memory to spare: {recompute / step:.0%} of the step",
        f"memory.remat={cfg.memory.remat} recomputes for {recompute * 1e3:.1f} ms per step; the step's peak is "
        f"{peak_now / 2**20:,.0f} MiB" + (f", {peak_new / 2**20:,.0f} MiB without remat (compile-only estimate)"
                                          if peak_new else "") + f", of {limit / 2**20:,.0f} MiB per device"
        + (f"; timed here without remat: {measured:.0%} faster" if measured is not None else ""),
        over, estimate, step, None, {"recompute_s": recompute, "peak_bytes": peak_now,
                                     "peak_bytes_new": peak_new, "limit_bytes": limit, "measured_gain": measured})
    if measured is not None:  # the device model's figure stays estimated_gain; this machine's is the measured one
        found["estimated_gain_here"] = round(min(estimate, measured), 4)
    return found


def _measured_remat_gain(cfg: Config, over: list[str], estimate: float) -> float:
    """On XLA:CPU the saved recomputation is not the gain (without remat the step was measured 9-16% slower:
    keeping the activations costs memory traffic the time model does not see), so the rule calibrates:
    it times the suggestion against the profiled config as `--verify` does (verify.py) and uses that."""
    from picotron_jax.profile.verify import verify

    check = verify(cfg, {"kind": "remat_recompute", "suggestion": over, "estimated_gain": estimate,
                         "estimated_gain_here": estimate}, rounds=3, steps=2, log=lambda _m: None)
    return check["measured_gain"]


def _optimizer(report, cfg, sizes, step, share, spare, n, devices):
    opt = next((m for m in report["modules"] if m["module"] == "optimizer"), None)
    d = sizes["data"]
    if opt is None or d < 2 or cfg.train.zero_stage != 0 or opt["time_s"] < 0.1 * step:
        return None
    over = ["train.zero_stage=1"]
    if not _valid(cfg, over, n):
        return None
    return _finding(
        "optimizer_share", f"optimizer update: {opt['time_s'] / step:.0%} of the step on every data replica",
        f"the AdamW update takes {opt['time_s'] * 1e3:.1f} ms per step and every one of the {d} data replicas "
        f"does all of it; ZeRO-1 gives each 1/{d} of the state and the update", over,
        opt["time_s"] / step * (1 - 1 / d), step, None, {"optimizer_s": opt["time_s"]})


def _small_batch(report, cfg, sizes, step, share, spare, n, devices):
    mm = [m for m in report["modules"] if m["module"] in ("mlp", "qkv", "attn_out", "head")]
    rate = [m["peak_fraction"] for m in mm if m["peak_fraction"] is not None]
    rows = cfg.train.global_batch // max(sizes["data"] * sizes["expert"], 1)
    tokens = rows * cfg.train.seq_len
    if not rate or tokens > 4096:
        return None
    achieved = sum(r * m["time_s"] for r, m in zip(rate, mm)) / max(sum(m["time_s"] for m in mm), 1e-12)
    b = report["breakdown"]
    compute = b.get("compute", 0.0)
    # per-step costs that do not grow with the batch: the runtime, the host, and the gradient and parameter
    # collectives (over data / pipe; activation exchanges over tensor, context, expert and pipe permutes grow)
    grads = sum(max(r["time_s"] - r["wait_s"], 0.0) for r in report["collectives"]
                if r["kind"] in ("all-reduce", "all-gather", "reduce-scatter")
                and set(r["axes"]) <= {"data", "pipe", "none"})
    fixed = b.get("runtime", 0.0) + b.get("host", 0.0) + grads
    if achieved > 0.3 and fixed < 0.3 * step:
        return None
    k = 4
    over = [f"train.global_batch={cfg.train.global_batch * k}"]
    if not _valid(cfg, over, n):
        return None
    gain = (1.0 - 1.0 / k) * fixed / step
    return _finding(
        "small_batch", f"small per-device batch: {tokens} tokens per device, matmuls at {achieved:.0%} of peak",
        f"each device computes on {rows} x {cfg.train.seq_len} tokens; its matmul modules reach {achieved:.0%} of "
        f"the device peak and {fixed / step:.0%} of the step goes to per-step costs that do not grow with the "
        f"batch (gradient collectives, runtime, host): a {k}x larger batch spreads them over {k}x the tokens "
        f"(per-token gain; scale optimizer.lr with it)",
        over, gain, step, None, {"tokens_per_device": tokens, "matmul_peak_fraction": achieved,
                                 "fixed_s": fixed, "compute_s": compute})


def _larger_microbatch(report, cfg, sizes, step, share, spare, n, devices):
    """Gradient accumulation with memory to spare and small microbatches: each microbatch pays the loop's
    per-iteration costs (the program's runtime between ops, launch overhead), so halving train.grad_accum
    (twice the microbatch, same global batch and math) halves them. Proposed only when the suggestion's
    compile-only peak (memory/estimate.py) stays under 80% of the budget."""
    ga = cfg.train.grad_accum
    rows = cfg.train.global_batch // max(ga * sizes["data"] * sizes["expert"], 1)
    tokens = rows * cfg.train.seq_len
    runtime = report["breakdown"].get("runtime", 0.0)
    if ga < 2 or tokens > 4096 or runtime < 0.05 * step or devices is None:
        return None
    from picotron_jax.profile.memory_rule import memory_budget

    limit = memory_budget(cfg, report)
    over = [f"train.grad_accum={ga // 2}"]
    if not limit or not _valid(cfg, over, n):
        return None
    from picotron_jax.memory.estimate import estimate_memory

    peak_new = estimate_memory(cfg.with_overrides(over), devices).peak_bytes
    if peak_new > 0.8 * limit:
        return None
    return _finding(
        "larger_microbatch", f"small microbatches with memory to spare: {tokens} tokens per device per microbatch",
        f"train.grad_accum={ga} runs {ga} microbatches of {rows} x {cfg.train.seq_len} tokens per device; "
        f"{runtime / step:.0%} of the step is the program's runtime between ops (per-iteration costs); "
        f"with grad_accum={ga // 2} the compile-only peak is {peak_new / 2**20:,.0f} MiB of "
        f"{limit / 2**20:,.0f} MiB per device (the step's now: {report['memory']['peak_bytes'] / 2**20:,.0f} MiB)",
        over, 0.5 * runtime / step, step, None,
        {"tokens_per_microbatch": tokens, "runtime_s": runtime, "peak_bytes_new": peak_new, "limit_bytes": limit})


def _host(report, cfg, sizes, step, share, spare, n, devices):
    host = report["breakdown"].get("host", 0.0)
    if host < 0.1 * step:
        return None
    over = [f"logging.every={max(cfg.logging.every * 10, 100)}"]
    if cfg.logging.progress:
        over.append("logging.progress=false")
    return _finding(
        "host_overhead", f"devices wait for the host: {host / step:.0%} of the step",
        f"the devices sit idle {host * 1e3:.1f} ms per step while the loop dispatches, logs (a log row syncs "
        f"the device every logging.every={cfg.logging.every} steps) and runs callbacks", over,
        host / step, step, spare, {"host_s": host})  # an upper bound: all of the host time
