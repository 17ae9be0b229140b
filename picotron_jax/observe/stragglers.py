"""The straggler detector (monitor kind `straggler`): the process whose own time of a logged interval
(waiting for its data plus its callbacks: what the others then wait for inside their collectives) exceeds
`monitor.straggler_factor` x the median of the other processes and `monitor.straggler_min_s` seconds.

Each process writes its step-time split to RUN_DIR/processes/P.jsonl at every logged row
(observe/step_time.py); process 0 reads the newest step that every process has written, so nothing is
added to the step's collectives and a straggler is named within one logging interval. Needs a run
directory that every process sees (one host, or a shared file system); otherwise the detector is silent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def newest_rows(path: Path, tail_bytes: int = 8192) -> dict[int, dict]:
    """The last rows of one process's file, by step (only the file's tail is read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines[1:] if size > tail_bytes else lines:
        try:
            row = json.loads(line)
            out[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short (being written)
    return out


def find_straggler(run_dir: Path, num_processes: int, factor: float, min_s: float, after: int,
                   upto: int | None = None):
    """(step, process, own seconds, the others' median) for the newest step in (`after`, `upto`] that every
    process wrote, when one process is a straggler; (step, None, ...) when none is; None when no such step
    yet (`upto`: the current step, so rows a resumed run left behind past it are not judged)."""
    per_process = [newest_rows(run_dir / "processes" / f"{p}.jsonl") for p in range(num_processes)]
    common = set.intersection(*(set(rows) for rows in per_process)) if per_process else set()
    steps = [s for s in common if s > after and (upto is None or s <= upto)]
    if not steps:
        return None
    step = max(steps)
    own = np.asarray([per_process[p][step]["data_s"] + per_process[p][step]["host_s"] for p in range(num_processes)])
    worst = int(np.argmax(own))
    median = float(np.median(np.delete(own, worst)))  # the others' median: with 2 processes, the other one's
    if own[worst] > max(factor * median, min_s):
        return step, worst, float(own[worst]), median
    return step, None, float(own[worst]), median
