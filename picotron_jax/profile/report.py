"""profile.json, profile.md and the printed summary of an analysed window."""

from __future__ import annotations

import json
from pathlib import Path


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    tmp = out / "profile.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
    tmp.replace(out / "profile.json")
    (out / "profile.md").write_text(markdown(report))
    return out / "profile.json", out / "profile.md"


def summary_lines(report: dict, top: int = 3) -> list[str]:
    c = report["config"]
    lines = [f"profile of {report['steps']} steps (from step {report['first_step']}) on {c['mesh']}: "
             f"{_ms(report['step_s'])} ms per step"]
    parts = sorted(report["breakdown_share"].items(), key=lambda kv: -kv[1])
    lines.append("  time: " + ", ".join(f"{k} {v:.0%}" for k, v in parts if v >= 0.005))
    for i, f in enumerate(report["findings"][:top]):
        sug = " ".join(f["suggestion"]) or "(no setting)"
        lines.append(f"  {i + 1}. {f['title']} -> {sug} (est. {f['estimated_gain']:.0%} of the step, "
                     f"{f['estimated_gain_here']:.0%} on this machine)")
    if not report["findings"]:
        lines.append("  no bottleneck rule fired")
    for w in report.get("withheld", []):
        lines.append(f"  not proposed: {' '.join(w['suggestion'])}: {w['reason']}")
    return lines


def markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    L = [f"# Profile: {c['mesh']}", "",
         f"{r['steps']} steps from step {r['first_step']} on {c['num_devices']} {c['platform']} device(s) "
         f"({c['device_kind']}); {c['tokens_per_step']:,} tokens per step; remat {c['remat']}, ZeRO-{c['zero_stage']},"
         f" pipeline {c['pipeline']}.", "",
         f"**Step time {_ms(r['step_s'])} ms** (loop wall clock); the trace's window gives {_ms(r['trace_step_s'])} ms.",
         ""]
    if m["shared_cores"]:
        L += [f"Note: {c['num_devices']} virtual devices share {c['host_cores']} CPU cores; on average "
              f"{m['busy_devices']:.1f} devices compute at once, so time a device waits is used by the others "
              f"(spare capacity {m['spare']:.0%}). Gains marked 'here' account for that.", ""]
    L += ["## Findings (ranked by estimated gain)", ""]
    if not r["findings"]:
        L.append("No bottleneck rule fired.")
    for i, f in enumerate(r["findings"]):
        L += [f"{i + 1}. **{f['title']}** (`{f['kind']}`)", f"   - evidence: {f['evidence']}",
              f"   - suggestion: `{' '.join(f['suggestion'])}`" if f["suggestion"] else "   - suggestion: none",
              f"   - estimated gain: {f['estimated_gain']:.1%} of the step ({_ms(f['estimated_gain_s'])} ms); "
              f"here {f['estimated_gain_here']:.1%}"]
    for w in r.get("withheld", []):
        L.append(f"- not proposed: `{' '.join(w['suggestion'])}`: {w['reason']}")
    L += ["", "## Where the step's time goes (mean over devices)", "", "| category | ms per step | share |", "|---|---:|---:|"]
    for k, v in sorted(r["breakdown"].items(), key=lambda kv: -kv[1]):
        L.append(f"| {k} | {_ms(v)} | {_pct(r['breakdown_share'][k])} |")
    L += ["", f"Communication hidden under compute: {_pct(r['overlap'])}.", ""]
    L += ["## Per device (ms per step)", "", "| device | mesh position | compute | collective | waiting | "
          "host callback | not executing |", "|---|---|---:|---:|---:|---:|---:|"]
    for d in r["devices"]:
        pos = " ".join(f"{a}={i}" for a, i in d["coords"].items())
        L.append(f"| {d['device']} | {pos} | {_ms(d['compute_s'])} | {_ms(d['collective_s'])} | {_ms(d['wait_s'])} | "
                 f"{_ms(d['host_callback_s'])} | {_ms(d['idle_s'])} |")
    if r.get("straggler"):
        s = r["straggler"]
        L += ["", f"Straggler: device {s['device']} waits {_ms(s['wait_s'])} ms, the others {_ms(s['others_wait_s'])} ms."]
    L += ["", "## Modules (per device, per step)", "",
          "| module | time ms | fwd | bwd | recompute | update | GFLOP (executed) | GFLOP/s | of peak | "
          "collectives ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mo in r["modules"]:
        rate = "-" if mo["flops_per_s"] is None else f"{mo['flops_per_s'] / 1e9:,.1f}"
        L.append(f"| {mo['module']} | {_ms(mo['time_s'])} | {_ms(mo['forward_s'])} | {_ms(mo['backward_s'])} | "
                 f"{_ms(mo['recompute_s'])} | {_ms(mo['update_s'])} | {mo['flops'] / 1e9:,.3f} | {rate} | "
                 f"{_pct(mo['peak_fraction'])} | {_ms(mo['collective_s'])} |")
    fl = r["flops"]
    L += ["", f"FLOPs per device and program execution: modules sum to {fl['modules_sum']:.4g}, XLA's cost_analysis "
          f"{fl['cost_analysis']:.4g} (loop bodies once); executed in the window {fl['executed_per_device']:.4g} per "
          f"step. Peak per device {m['peak_flops_device'] / 1e9:,.1f} GFLOP/s. The scanned layers are one loop body: "
          f"modules are summed over layers.", ""]
    L += ["## Collectives (per device, per step)", "", "| kind | mesh axes | count | MiB | time ms | waiting ms | GB/s |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for co in r["collectives"]:
        bw = "-" if co["bandwidth_gbps"] is None else f"{co['bandwidth_gbps']:.2f}"
        L.append(f"| {co['kind']} | {','.join(co['axes'])} | {co['count']:.0f} | {co['bytes'] / 2**20:,.2f} | "
                 f"{_ms(co['time_s'])} | {_ms(co['wait_s'])} | {bw} |")
    mem = r["memory"]
    L += ["", "## Memory (compiled, per device)", "",
          f"arguments {mem['argument_bytes'] / 2**20:,.1f} MiB (parameters {mem['params_bytes'] / 2**20:,.1f}, "
          f"optimizer {mem['opt_state_bytes'] / 2**20:,.1f}), temporaries {mem['temp_bytes'] / 2**20:,.1f} MiB, "
          f"peak {mem['peak_bytes'] / 2**20:,.1f} MiB" + (f" of {mem['limit_bytes'] / 2**20:,.0f} MiB"
                                                        if mem.get("limit_bytes") else "") + ".", "",
          "Largest values produced by one op:", ""]
    for b in mem["largest_buffers"]:
        L.append(f"- {b['bytes'] / 2**20:,.2f} MiB `{b['op']}` ({b['module']}, {b['phase']})")
    L.append("")
    L.append("Allocator: " + ("no statistics on this backend" if not mem.get("allocator") else
                              f"peak {mem['allocator'].get('peak_bytes_in_use', 0) / 2**20:,.1f} MiB, fragmentation "
                              f"{mem['allocator']['fragmentation']:.1%}"))
    if r.get("pipeline"):
        p = r["pipeline"]
        L += ["", "## Pipeline", "", f"{p['schedule']} p={p['p']} m={p['m']} v={p['v']}: bubble measured "
              f"{_pct(p['bubble_measured'])} of the loop, analytic {_pct(p['bubble_analytic'])}, counted "
              f"{_pct(p['bubble_counted'])}; the loop is {_pct(p['loop_share'])} of the window."]
    if r.get("moe"):
        mo = r["moe"]
        L += ["", "## MoE", "", f"load max/mean per MoE layer: {', '.join(f'{x:.2f}' for x in mo['load_max_over_mean'])};"
              f" all-to-all waiting {_ms(mo['all_to_all_wait_s'])} ms per step"
              + (f"; capacity drops up to {mo['dropped_fraction_bound']:.1%} of token copies"
                 if mo["dropped_fraction_bound"] is not None else "") + "."]
    d = r["data"]
    L += ["", "## Data and host", "", f"waiting for batches {_ms(d['wait_s'])} ms per step; batch reads "
          f"{_ms(d['read_s'])} ms per step on the loader thread ({d['reads']} in the window); devices waiting for the "
          f"host {_ms(r['host']['host_s'])} ms per step.", "",
          "GPU-only numbers: " + "; ".join(f"{k}: {v}" for k, v in r["gpu_only"].items()), "",
          f"Trace: `{r['trace']['dir']}` (`xprof --logdir {r['trace']['dir']}` or "
          f"`tensorboard --logdir {r['trace']['dir']}`; Perfetto opens the .trace.json.gz).", ""]
    if r.get("verify"):
        v = r["verify"]
        L += ["## Verification", "", f"`{' '.join(v['suggestion'])}`: measured gain {v['measured_gain']:.1%} against "
              f"the estimate {v['estimated_gain_here']:.1%} here ({v['estimated_gain']:.1%} device model); "
              f"{'within' if v['within_tolerance'] else 'outside'} the tolerance ±{v['tolerance']:.1%}.", ""]
    return "\n".join(L)
