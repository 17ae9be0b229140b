"""`picotron-jax profile --compare RUN_A RUN_B`: where time, memory and bytes moved between two profiles."""

from __future__ import annotations

import json
from pathlib import Path

from picotron_jax.errors import UserError


def load_profile(path: str | Path) -> dict:
    p = Path(path)
    for candidate in (p, p / "profile.json", p / "profile" / "profile.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise UserError(f"no profile.json at {path} (nor {p / 'profile.json'} or {p / 'profile' / 'profile.json'}); "
                    f"profile it first: picotron-jax profile --config FILE --out DIR")


def compare(a: dict, b: dict) -> dict:
    cats = sorted(set(a["breakdown"]) | set(b["breakdown"]))
    time = {c: {"a": a["breakdown"].get(c, 0.0), "b": b["breakdown"].get(c, 0.0)} for c in cats}
    mods_a = {m["module"]: m for m in a["modules"]}
    mods_b = {m["module"]: m for m in b["modules"]}
    modules = {}
    for name in sorted(set(mods_a) | set(mods_b)):
        ma, mb = mods_a.get(name, {}), mods_b.get(name, {})
        modules[name] = {k: {"a": ma.get(k, 0.0) or 0.0, "b": mb.get(k, 0.0) or 0.0}
                         for k in ("time_s", "flops", "collective_s", "recompute_s")}
    keys = ("argument_bytes", "temp_bytes", "peak_bytes", "params_bytes", "opt_state_bytes")
    memory = {k: {"a": a["memory"].get(k, 0), "b": b["memory"].get(k, 0)} for k in keys}
    coll = {}
    for side, rep in (("a", a), ("b", b)):
        for r in rep["collectives"]:
            key = f"{r['kind']} over {','.join(r['axes'])}"
            coll.setdefault(key, {"a": {"bytes": 0.0, "time_s": 0.0}, "b": {"bytes": 0.0, "time_s": 0.0}})
            coll[key][side] = {"bytes": r["bytes"], "time_s": r["time_s"]}
    return {"step_s": {"a": a["step_s"], "b": b["step_s"]}, "time": time, "modules": modules, "memory": memory,
            "collectives": coll, "configs": {"a": a["config"], "b": b["config"]}}


def format_compare(c: dict, name_a: str, name_b: str) -> str:
    def ms(x):
        return f"{x * 1e3:,.1f}"

    sa, sb = c["step_s"]["a"], c["step_s"]["b"]
    lines = [f"A = {name_a} ({c['configs']['a']['mesh']}), B = {name_b} ({c['configs']['b']['mesh']})",
             f"step: {ms(sa)} ms -> {ms(sb)} ms ({(sb - sa) / sa:+.1%})", "",
             f"{'time per step':<28} {'A ms':>10} {'B ms':>10} {'B-A ms':>10}"]
    for k, v in sorted(c["time"].items(), key=lambda kv: -abs(kv[1]["b"] - kv[1]["a"])):
        lines.append(f"{k:<28} {ms(v['a']):>10} {ms(v['b']):>10} {(v['b'] - v['a']) * 1e3:>+10,.1f}")
    lines += ["", f"{'module':<28} {'A ms':>10} {'B ms':>10} {'B-A ms':>10} {'A GFLOP':>9} {'B GFLOP':>9}"]
    for k, v in sorted(c["modules"].items(), key=lambda kv: -abs(kv[1]["time_s"]["b"] - kv[1]["time_s"]["a"])):
        t, f = v["time_s"], v["flops"]
        lines.append(f"{k:<28} {ms(t['a']):>10} {ms(t['b']):>10} {(t['b'] - t['a']) * 1e3:>+10,.1f} {f['a'] / 1e9:>9.3f} "
                     f"{f['b'] / 1e9:>9.3f}")
    lines += ["", f"{'memory per device':<28} {'A MiB':>10} {'B MiB':>10} {'B-A MiB':>10}"]
    for k, v in c["memory"].items():
        lines.append(f"{k:<28} {v['a'] / 2**20:>10,.1f} {v['b'] / 2**20:>10,.1f} {(v['b'] - v['a']) / 2**20:>+10,.1f}")
    lines += ["", f"{'collective bytes per step':<28} {'A MiB':>10} {'B MiB':>10} {'A ms':>8} {'B ms':>8}"]
    for k, v in sorted(c["collectives"].items()):
        lines.append(f"{k:<28} {v['a']['bytes'] / 2**20:>10,.2f} {v['b']['bytes'] / 2**20:>10,.2f} "
                     f"{ms(v['a']['time_s']):>8} {ms(v['b']['time_s']):>8}")
    return "\n".join(lines)
