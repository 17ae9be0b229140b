"""The memory-pressure rule: a step whose peak is near its budget gets the memory planner's proposal.

The budget is `profile.memory_budget` (bytes per device, e.g. "512MiB") or, when unset, the device's
memory (the allocator's limit on a GPU, host memory / devices on CPU). When the compiled peak passes
90% of it, the planner (picotron_jax/memory/planner.py) compiles remat policy x microbatch count x
ZeRO stage candidates for abstract inputs and proposes the fastest that fits 90% of the budget.
Such a finding is about fitting, not speed: `gain_kind` is "memory", `estimated_gain` the share of
the peak it saves, `estimated_cost` the extra FLOPs per step the plan pays (recomputation), and
memory findings rank before the speed findings (a run over its budget must fit first).
"""

from __future__ import annotations

from picotron_jax.config import Config
from picotron_jax.memory.estimate import mib
from picotron_jax.units import parse_bytes

PRESSURE = 0.9  # peak / budget above which the rule fires, and the share of the budget a plan must fit


def memory_budget(cfg: Config, report: dict) -> int | None:
    if cfg.profile.memory_budget:
        return parse_bytes(cfg.profile.memory_budget)
    return report["memory"].get("limit_bytes")


def memory_pressure(report: dict, cfg: Config, num_devices: int, devices) -> dict | None:
    budget = memory_budget(cfg, report)
    peak = report["memory"].get("peak_bytes")
    if not budget or not peak or peak < PRESSURE * budget or devices is None:
        return None
    from picotron_jax.memory.planner import candidate_space, choose, plan

    table = plan(cfg, devices, candidate_space(cfg, num_devices))
    now_flops = next((c.estimate.flops for c in table if (c.remat, c.grad_accum, c.zero_stage)
                      == (cfg.memory.remat, cfg.train.grad_accum, cfg.train.zero_stage)), None)
    choice = choose(table, int(PRESSURE * budget))
    where = f"the step's compiled peak is {mib(peak)} of a {mib(budget)} budget per device"
    if choice is None:
        smallest = min(table, key=lambda c: c.peak)
        return _memory_finding(
            f"memory pressure: {peak / budget:.0%} of the budget, no remat/microbatch/ZeRO plan fits",
            f"{where}; the smallest of {len(table)} compiled plans (remat={smallest.remat} grad_accum="
            f"{smallest.grad_accum} zero_stage={smallest.zero_stage}) still needs {mib(smallest.peak)}: add devices "
            f"on data (with ZeRO-3) or tensor, or shorten train.seq_len", [], 0.0, None, peak, budget, smallest.peak)
    over = [f"memory.remat={choice.remat}", f"train.grad_accum={choice.grad_accum}",
            f"train.zero_stage={choice.zero_stage}"]
    current = [f"memory.remat={cfg.memory.remat}", f"train.grad_accum={cfg.train.grad_accum}",
               f"train.zero_stage={cfg.train.zero_stage}"]
    over = [o for o, c in zip(over, current) if o != c]
    cost = choice.estimate.flops / now_flops - 1.0 if now_flops else None
    return _memory_finding(
        f"memory pressure: {peak / budget:.0%} of the budget -> the planner's fastest plan that fits",
        f"{where}; the memory planner compiled {len(table)} plans and the fastest that fits {PRESSURE:.0%} of the "
        f"budget peaks at {mib(choice.peak)}" + (f", for {cost:+.0%} FLOPs per step" if cost is not None else ""),
        over, 1.0 - choice.peak / peak, cost, peak, budget, choice.peak)


def _memory_finding(title, evidence, suggestion, gain, cost, peak, budget, peak_new) -> dict:
    return {"kind": "memory_pressure", "title": title, "evidence": evidence, "suggestion": suggestion,
            "estimated_gain": round(max(gain, 0.0), 4), "estimated_gain_s": 0.0,
            "estimated_gain_here": round(max(gain, 0.0), 4), "gain_kind": "memory",
            "estimated_cost": None if cost is None else round(cost, 4),
            "numbers": {"peak_bytes": peak, "budget_bytes": budget, "peak_bytes_new": peak_new}}
