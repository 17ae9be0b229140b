"""Each device's timeline in the profiling window, split into what it was doing, without double counting.

For device d, every instant of the window [first step starts, last step ends] goes to one category,
the first in this order that covers it (Holistic Trace Analysis' temporal breakdown, with the
waiting that XLA:CPU's collectives make visible):

  collective_wait   inside a collective, waiting for the other devices to arrive (the rendezvous'
                    "Wait: pending_threads" events, which each collective's event encloses on CPU)
  <collective kind> inside a collective otherwise (the data movement), per kind
  host_callback     a host callback custom-call (jax.pure_callback / io_callback)
  compute           any other XLA op
  runtime           inside the program's execution but in no op (executor, loop control, waiting
                    for a CPU thread when virtual devices share cores)
  data              not executing while the loop waits for its next batch (between two steps)
  host              not executing otherwise, until the device's last program of the window ends
                    (dispatch, Python, logging: the device waits for the host)
  idle              not executing after that (its part of the last step is done; others still run)

The categories add up to the window by construction; the window itself is measured on the trace's
clock and compared with the loop's wall clock (analysis.py).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

from picotron_jax.profile.program import Program
from picotron_jax.profile.trace import Event, Trace

CATEGORIES = ("compute", "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
              "other-collective", "collective_wait", "host_callback", "runtime", "data", "host", "idle")
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_WAIT_PREFIX = "Wait: pending_threads"


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersect_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """|A ∩ B| of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


@dataclass
class DeviceTimeline:
    device: int
    seconds: dict[str, float] = field(default_factory=dict)  # category -> seconds in the window
    wait_by_kind: dict[str, float] = field(default_factory=dict)
    collective_time: dict[str, float] = field(default_factory=dict)  # kind -> event time incl. wait
    overlap: float = 0.0  # seconds of collective time that ran while an op of compute ran too
    op_time: dict[str, float] = field(default_factory=dict)  # op name -> summed event time
    op_runs: dict[str, int] = field(default_factory=dict)  # op name -> executions in the window
    loop_time: dict[str, float] = field(default_factory=dict)  # while op -> first to last op of its body, per run
    loop_compute: dict[str, float] = field(default_factory=dict)  # while op -> compute of its body's ops
    loop_wait: dict[str, float] = field(default_factory=dict)  # while op -> waiting in its body's collectives
    loop_transfer: dict[str, float] = field(default_factory=dict)  # while op -> its collectives' time, not waiting


@dataclass
class Window:
    start: float
    end: float
    steps: int
    step_spans: list[tuple[float, float]]  # the loop's host part of each step
    between: list[tuple[float, float]]  # the loop between two steps (waiting for the next batch)
    reads: list[tuple[float, float]]  # batch reads on the loader thread

    @property
    def seconds(self) -> float:
        return self.end - self.start


def find_window(trace: Trace, step_name: str, read_name: str) -> Window:
    steps = [e for e in trace.events if e.name == step_name]
    if not steps:
        raise ValueError(f"no '{step_name}' step annotations in {trace.source}")
    spans = [(e.ts, e.end) for e in steps]
    between = [(a[1], b[0]) for a, b in zip(spans, spans[1:]) if b[0] > a[1]]
    reads = [(e.ts, e.end) for e in trace.events if e.name == read_name]
    return Window(spans[0][0], spans[-1][1], len(steps), spans, between, reads)


def _clip(e: Event, w: Window) -> tuple[float, float]:
    return max(e.ts, w.start), min(e.end, w.end)


def device_timelines(trace: Trace, program: Program, window: Window) -> dict[int, DeviceTimeline]:
    waits_by_tid: dict[int, list[Event]] = defaultdict(list)
    for e in trace.events:
        if e.name.startswith(_WAIT_PREFIX):
            waits_by_tid[e.tid].append(e)
    wait_starts = {tid: [e.ts for e in es] for tid, es in waits_by_tid.items()}

    per_device: dict[int, list[Event]] = defaultdict(list)
    for e in trace.events:
        op = e.args.get("hlo_op", e.name if e.name in program.ops else None)
        if op is None or op not in program.ops or e.end < window.start or e.ts > window.end:
            continue
        d = trace.device_of(e)
        if d is not None:
            per_device[d].append(e)

    out = {}
    for d, events in sorted(per_device.items()):
        out[d] = _one_device(d, events, program, window, waits_by_tid, wait_starts)
    return out


def _one_device(d: int, events: list[Event], program: Program, window: Window, waits_by_tid, wait_starts):
    tl = DeviceTimeline(d)
    cats: dict[str, list[tuple[float, float]]] = defaultdict(list)
    runs: dict[str, list[float]] = {}
    loop_spans: dict[tuple[str, str], list[float]] = {}
    loop_compute: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        name = e.args.get("hlo_op", e.name)
        op = program.ops[name]
        a, b = _clip(e, window)
        run = str(e.args.get("run_id", ""))
        span = runs.setdefault(run, [a, b])
        span[0], span[1] = min(span[0], a), max(span[1], b)
        tl.op_time[name] = tl.op_time.get(name, 0.0) + (b - a)
        tl.op_runs[name] = tl.op_runs.get(name, 0) + 1
        if op.loop:  # XLA:CPU's while event does not enclose its body's ops: time the loop by its body
            ls = loop_spans.setdefault((op.loop, run), [a, b])
            ls[0], ls[1] = min(ls[0], a), max(ls[1], b)
            if not op.control and not op.collective and not op.host_callback:
                loop_compute[op.loop].append((a, b))
        if op.control:
            continue
        if op.collective:
            kind = op.collective if op.collective in COLLECTIVE_KINDS else "other-collective"
            cats[kind].append((a, b))
            tl.collective_time[kind] = tl.collective_time.get(kind, 0.0) + (b - a)
            waits = waits_by_tid.get(e.tid, [])
            lo = bisect.bisect_left(wait_starts.get(e.tid, []), e.ts)
            for w in waits[lo:]:
                if w.ts > e.end:
                    break
                wa, wb = max(w.ts, a), min(w.end, b)
                if wb > wa:
                    cats["collective_wait"].append((wa, wb))
                    tl.wait_by_kind[kind] = tl.wait_by_kind.get(kind, 0.0) + (wb - wa)
                    if op.loop:
                        tl.loop_wait[op.loop] = tl.loop_wait.get(op.loop, 0.0) + (wb - wa)
                        tl.loop_transfer[op.loop] = tl.loop_transfer.get(op.loop, 0.0) - (wb - wa)
            if op.loop:
                tl.loop_transfer[op.loop] = tl.loop_transfer.get(op.loop, 0.0) + (b - a)
        elif op.host_callback:
            cats["host_callback"].append((a, b))
        else:
            cats["compute"].append((a, b))
    spans = merge([(a, b) for a, b in runs.values()])
    cats["runtime"] = spans
    cats["data"] = list(window.between)
    last_end = spans[-1][1] if spans else window.start
    cats["host"] = [(window.start, last_end)]
    cats["idle"] = [(window.start, window.end)]
    merged = {k: merge(v) for k, v in cats.items()}
    covered: list[tuple[float, float]] = []
    order = ("collective_wait",) + COLLECTIVE_KINDS + ("other-collective", "host_callback", "compute", "runtime",
                                                      "data", "host", "idle")
    for cat in order:
        before = length(covered)
        covered = merge(covered + merged.get(cat, []))
        tl.seconds[cat] = length(covered) - before
    comm = merge([iv for k in COLLECTIVE_KINDS + ("other-collective",) for iv in merged.get(k, [])])
    tl.overlap = intersect_length(comm, merged.get("compute", []))
    for (loop, _), (a, b) in loop_spans.items():
        tl.loop_time[loop] = tl.loop_time.get(loop, 0.0) + (b - a)
    for loop, ivs in loop_compute.items():
        tl.loop_compute[loop] = length(merge(ivs))
    return tl
