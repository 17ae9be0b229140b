"""The hang report: who is stuck where, who waits for whom, who compiled a different program, and why.

Reads the per-process dumps RUN_DIR/debug/hang-p<k>.json written by the flight recorder
(debug/recorder.py). For each process: the last thing its recorder saw (step and phase), the
innermost frame of its main thread, and whether that frame is inside JAX (waiting for the device,
that is for a collective with the others) or in the process's own Python code (a sleep, a lock, a
hung read). The processes in their own code, or behind the others, or without a dump, are the
stuck ones; those waiting inside JAX at the same step wait for them.
"""

from __future__ import annotations

import json
from pathlib import Path

_LIBRARIES = ("/jax/", "/jaxlib/", "/site-packages/", "/lib/python3")


def load_dumps(run_dir: str | Path) -> dict[int, dict]:
    out = {}
    for path in sorted((Path(run_dir) / "debug").glob("hang-p*.json")):
        try:
            dump = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written
        out[int(dump["process"])] = dump
    return out


def _innermost(stack: list[dict]) -> tuple[dict | None, bool]:
    """(innermost frame of the project's own code, whether the thread is inside a library below it)."""
    ours = [f for f in stack if not any(lib in f["file"] for lib in _LIBRARIES)]
    if not ours:
        return (stack[-1] if stack else None), True
    top = ours[-1]
    return top, stack.index(top) < len(stack) - 1 and any(lib in f["file"] for f in stack[stack.index(top):] for lib in ("/jax/", "/jaxlib/"))


def _where(frame: dict | None) -> str:
    if frame is None:
        return "unknown"
    return f"{Path(frame['file']).name}:{frame['line']} in {frame['function']}()"


def _last(dump: dict) -> tuple[int | None, str, int | None]:
    """(last finished step, the phase it was in, its step) from the recorder."""
    done, phase, at = None, "before the first step", None
    for e in dump.get("recorder", []):
        if e["phase"] == "data":  # batch reads run ahead on the prefetch thread
            continue
        phase, at = e["phase"], e["step"]
        if e["phase"] == "step done":
            done = e["step"]
    return done, phase, at


def _phase_text(phase: str, step: int | None) -> str:
    return {"step": f"step {step} (started, before or inside the device step)", "step done": f"after step {step}",
            "compile": f"compiling before step {step}", "checkpoint": f"checkpoint save of step {step}",
            "eval done": f"after evaluation at step {step}"}.get(phase, f"{phase} {step}")


def report(dumps: dict[int, dict], num_processes: int | None = None) -> str:
    """The text report for these dumps (num_processes: how many there should be)."""
    n = num_processes or max((d.get("num_processes", 1) for d in dumps.values()), default=0)
    lines = [f"hang report: {len(dumps)} of {n} process(es) left a dump"]
    problem = next((d["problem"] for _, d in sorted(dumps.items())), "")
    if problem:
        lines.append(f"watchdog: {problem}")
    missing = [p for p in range(n) if p not in dumps]
    state = {}
    for p, d in sorted(dumps.items()):
        done, phase, at = _last(d)
        frame, in_jax = _innermost(d.get("main_stack", []))
        state[p] = (done, in_jax)
        doing = "waiting inside JAX (the device step / a collective)" if in_jax else "in its own Python code"
        lines.append(f"  process {p} (host {d.get('host')}, pid {d.get('pid')}): last finished step {done}; "
                     f"phase: {_phase_text(phase, at)}; main thread {doing} at {_where(frame)}")
    for p in missing:
        lines.append(f"  process {p}: no dump (dead, frozen or killed before it could write one)")
    programs: dict = {}
    for p, d in sorted(dumps.items()):
        programs.setdefault((d.get("program") or {}).get("fingerprint"), []).append(p)
    if len(programs) > 1:
        lines.append("programs differ: " + "; ".join(f"process(es) {ps} compiled {fp}" for fp, ps in programs.items())
                     + " (a config or shape mismatch: the collectives cannot match)")
        seqs = {p: (dumps[p].get("program") or {}).get("collectives", []) for p in dumps}
        ref = min(seqs)
        for p, seq in sorted(seqs.items()):
            diff = next((i for i, (a, b) in enumerate(zip(seqs[ref], seq)) if a != b), None)
            if diff is None and len(seq) != len(seqs[ref]):
                diff = min(len(seq), len(seqs[ref]))
            if p != ref and diff is not None:
                lines.append(f"  first differing collective, #{diff}: process {ref} runs "
                             f"{(seqs[ref][diff:diff + 1] or ['nothing'])[0]}, process {p} runs "
                             f"{(seq[diff:diff + 1] or ['nothing'])[0]}")
    else:
        fp = next(iter(programs))
        count = len((dumps[min(dumps)].get("program") or {}).get("collectives", [])) if dumps else 0
        lines.append(f"programs: every process compiled the same train step ({fp}, {count} collectives)")
    known = [s[0] for s in state.values() if s[0] is not None]
    low = min(known) if known else None
    stuck = sorted(set(missing) | {p for p, (done, in_jax) in state.items()
                                   if not in_jax or (low is not None and (done is None or done == low)
                                                     and max(known) > low)})
    waiting = sorted(p for p in state if p not in stuck)
    if stuck and waiting:
        lines.append(f"waiting: process(es) {waiting} wait for process(es) {stuck}")
    if len(programs) > 1:
        cause = "the processes run different programs (compare their configs and code); their collectives never match"
    elif missing:
        cause = f"process(es) {missing} died or froze; the others wait for them in the next collective"
    elif stuck:
        first = stuck[0]
        frame, _ = _innermost(dumps[first].get("main_stack", []))
        done, phase, at = _last(dumps[first])
        cause = (f"process {first} is stuck in its own code at {_where(frame)} during "
                 f"{_phase_text(phase, at)}; the others wait for it in the step's collectives")
    else:
        cause = ("every process waits inside the same collective: a hung interconnect or device, or a step "
                 "slower than distributed.step_timeout_s")
    lines.append(f"likely cause: {cause}")
    return "\n".join(lines) + "\n"


def write_report_if_missing(run_dir: str | Path, num_processes: int) -> Path | None:
    """The launcher's turn (process 0 was the stuck one, or died): write the report from the dumps there are."""
    path = Path(run_dir) / "debug" / "hang-report.txt"
    dumps = load_dumps(run_dir)
    if not dumps or path.exists():
        return None
    path.write_text(report(dumps, num_processes))
    return path
