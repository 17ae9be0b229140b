"""Read a captured trace with the profiler's own outputs: the trace-events JSON, else XProf's converter.

`jax.profiler.stop_trace` writes both `<host>.xplane.pb` (XProf's format) and `<host>.trace.json.gz`
(Chrome trace-events JSON, which Perfetto and chrome://tracing open). The JSON is what we read:
complete events ("ph": "X") with a process and thread, a start and a duration in microseconds, a
name and arguments (XLA op events carry `hlo_op`, `hlo_module`, `run_id` and, on CPU, the
`device_ordinal` they ran for). Where only the xplane.pb is there (another tool copied it), XProf's
own converter (`xprof.convert.raw_to_tool_data`, tool `trace_viewer`) turns it into the same JSON.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from picotron_jax.errors import UserError

_DEVICE_RE = re.compile(r"/device:[A-Z]+:(\d+)")


@dataclass
class Event:
    name: str
    ts: float  # seconds (the trace's own clock)
    dur: float  # seconds
    pid: int
    tid: int
    args: dict

    @property
    def end(self) -> float:
        return self.ts + self.dur


@dataclass
class Trace:
    events: list[Event]
    thread_names: dict[tuple[int, int], str]
    process_names: dict[int, str]
    source: str  # the file read

    def device_of(self, e: Event) -> int | None:
        """The device (mesh position order: global device id) an op event ran for, else None."""
        if "device_ordinal" in e.args:
            return int(e.args["device_ordinal"])
        m = _DEVICE_RE.search(self.process_names.get(e.pid, ""))
        return int(m.group(1)) if m else None


def trace_files(trace_dir: Path) -> tuple[list[Path], list[Path]]:
    runs = sorted((trace_dir / "plugins" / "profile").glob("*"))
    if not runs:
        return [], []
    newest = runs[-1]
    return sorted(newest.glob("*.trace.json.gz")), sorted(newest.glob("*.xplane.pb"))


def load_trace(trace_dir: str | Path) -> Trace:
    """Every complete event of the newest capture under `trace_dir` (the folder given to start_trace)."""
    trace_dir = Path(trace_dir)
    jsons, planes = trace_files(trace_dir)
    if jsons:
        raw = json.loads(gzip.open(jsons[0], "rt").read())
        source = str(jsons[0])
    elif planes:
        raw, source = _convert_with_xprof(planes), str(planes[0])
    else:
        raise UserError(f"no profiler trace under {trace_dir} (expected plugins/profile/<run>/<host>.xplane.pb "
                        f"from jax.profiler); profile a run first: picotron-jax profile --config FILE --out DIR")
    events, threads, procs = [], {}, {}
    for e in raw.get("traceEvents", []):
        ph = e.get("ph")
        if ph == "M":
            if e.get("name") == "thread_name":
                threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
            elif e.get("name") == "process_name":
                procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif ph == "X":
            events.append(Event(e.get("name", ""), float(e["ts"]) * 1e-6, float(e.get("dur", 0.0)) * 1e-6,
                                int(e.get("pid", 0)), int(e.get("tid", 0)), e.get("args", {})))
    events.sort(key=lambda e: (e.ts, -e.dur))
    return Trace(events, threads, procs, source)


def _convert_with_xprof(planes: list[Path]) -> dict:
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        raise UserError("the trace has only an xplane.pb; reading it needs XProf: pip install xprof") from None
    data, _ = raw_to_tool_data.xspace_to_tool_data([str(p) for p in planes], "trace_viewer", {})
    if not data:
        raise UserError(f"XProf could not convert {planes[0]} (trace_viewer)")
    return json.loads(data)


def xprof_opens(trace_dir: str | Path) -> dict:
    """What XProf's own converters make of the capture: the tools it offers and the trace viewer's
    event count (the check that `xprof --logdir` / TensorBoard's profile plugin can open it)."""
    _, planes = trace_files(Path(trace_dir))
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        return {"available": False, "reason": "xprof is not installed (pip install xprof)"}
    paths = [str(p) for p in planes]
    tools = raw_to_tool_data.xspace_to_tool_names(paths)
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    events = len(json.loads(data).get("traceEvents", [])) if data else 0
    return {"available": True, "tools": tools, "trace_viewer_events": events, "xplane": paths}
