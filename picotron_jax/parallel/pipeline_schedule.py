"""Pipeline schedules as tables: which forward (F) and backward (B) each pipe rank runs in each time slot.

Pure Python (no JAX), so the schedules can be printed, counted and tested on their own. The
SPMD executor (`parallel/pipeline.py`) runs one `lax.scan` step per slot and reads its row of
these tables.

Model: p pipe ranks, m microbatches, v chunks ("virtual stages") per rank. Global stage
s = c·p + r runs chunk c on rank r, so the n = p·v stages form a ring that visits every rank
v times (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", section 2.2). In one time slot a rank runs one F or one B of one
(chunk, microbatch). Each rank follows its program (Megatron-LM's order: warm-up forwards, then
one forward / one backward, then cool-down backwards) and runs its next op as soon as its input
is there: the F of stage s needs the output of stage s-1 from an earlier slot, the B of stage s
the input-gradient of stage s+1 from an earlier slot (the last stage: its own F).

- `afab` (GPipe, Huang et al. 2019): every forward, then every backward.
- `1f1b` (PipeDream-Flush, Narayanan et al. 2019): p - r - 1 warm-up forwards on rank r, so it
  holds at most p - r microbatches between their F and their B: memory bounded by p, not m.
- `interleaved`: 1F1B over v chunks per rank, microbatches in groups of p (m % p == 0), with
  2(p - r - 1) + (v - 1)p warm-up chunk-forwards.

Bubble: one time unit per F or B (the analytic model of the papers); the bubble fraction is the
idle share of all ranks' slots. The analytic values are (p-1)/(m+p-1) for AFAB and 1F1B and
(p-1)/(v·m+p-1) for interleaved.

Time-weighted idle share (`idle_share`): a B costs more than an F (2x for the backward alone, which this
executor's B is: it runs the pullback its F saved; 3x under a remat policy that re-runs the forward), and the SPMD executor runs its slots in lockstep
(every slot ends in ring transfers all ranks join), so a slot lasts as long as its slowest rank's work.
`lockstep` is the idle share of that executor; `dataflow` that of the same programs on ranks that start
each op as soon as its input has arrived (the papers' model: it equals the analytic bubble for AFAB and
1F1B whatever the B/F ratio). Transfers cost nothing in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCHEDULES = ("afab", "1f1b", "interleaved")

# (chunk, microbatch) of one F or B; None = idle
Work = tuple[int, int] | None


@dataclass
class Schedule:
    """The simulated schedule plus the buffer slots the executor uses to hold activations/gradients."""

    kind: str
    p: int
    m: int
    v: int
    forward: list[list[Work]]  # [slot][rank]
    backward: list[list[Work]]  # [slot][rank]
    tables: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int32 [slots, p]
    act_slots: int = 0  # stage inputs a rank holds at most (received, or waiting for their B)
    grad_slots: int = 0  # input-gradients a rank holds at most (waiting for their B)

    @property
    def num_slots(self) -> int:
        return len(self.forward)

    @property
    def num_stages(self) -> int:
        return self.p * self.v

    def stage(self, rank: int, chunk: int) -> int:
        return chunk * self.p + rank

    def idle_slots(self) -> int:
        """Rank-slots with neither an F nor a B."""
        return sum(f is None and b is None for fs, bs in zip(self.forward, self.backward) for f, b in zip(fs, bs))

    def bubble_fraction(self) -> float:
        """Idle rank-slots / all rank-slots, counted from the executed table."""
        return self.idle_slots() / (self.num_slots * self.p)

    def analytic_bubble_fraction(self) -> float:
        v = self.v if self.kind == "interleaved" else 1
        return (self.p - 1) / (v * self.m + self.p - 1)

    def max_in_flight(self) -> list[int]:
        """Per rank: the most microbatch-chunks forwarded and not yet backwarded (stored inputs)."""
        peaks = []
        for r in range(self.p):
            live = peak = 0
            for t in range(self.num_slots):
                live += self.forward[t][r] is not None
                peak = max(peak, live)
                live -= self.backward[t][r] is not None
            peaks.append(peak)
        return peaks


def backward_cost(remat: str) -> float:
    """One B's cost in F's: 2 (the backward alone), 3 when the remat policy (`memory.remat`) re-runs the forward."""
    names = {item.partition(":")[0].strip() for item in remat.split(",") if item.strip()}
    return 2.0 if names <= {"none"} else 3.0


def idle_share(s: Schedule, cost_f: float = 1.0, cost_b: float = 2.0) -> dict[str, float]:
    """Time-weighted idle share of all ranks' time, with one F costing `cost_f` and one B `cost_b`:
    {"lockstep": this executor (a slot lasts its slowest rank's F + B), "dataflow": each op as soon as its
    input is there, in the same per-rank order}."""
    def cost(t: int, r: int) -> float:
        return cost_f * (s.forward[t][r] is not None) + cost_b * (s.backward[t][r] is not None)

    busy = sum(cost(t, r) for t in range(s.num_slots) for r in range(s.p))
    lockstep = sum(max(cost(t, r) for r in range(s.p)) for t in range(s.num_slots))
    dataflow = _dataflow_makespan(s, cost_f, cost_b)
    return {"lockstep": 1 - busy / (s.p * lockstep), "dataflow": 1 - busy / (s.p * dataflow)}


def _dataflow_makespan(s: Schedule, cost_f: float, cost_b: float) -> float:
    """End of the last op when every rank runs its program (in the table's order) without slots."""
    p, n = s.p, s.num_stages
    order = [[] for _ in range(p)]  # per rank: (op, stage, microbatch) in the order of the table
    for t in range(s.num_slots):
        for r in range(p):
            for op, w in (("F", s.forward[t][r]), ("B", s.backward[t][r])):
                if w is not None:
                    order[r].append((op, s.stage(r, w[0]), w[1]))
    end: dict[tuple[str, int, int], float] = {}
    free, pc = [0.0] * p, [0] * p
    while any(pc[r] < len(order[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pc[r] < len(order[r]):
                op, st, i = order[r][pc[r]]
                needs = [("F", st - 1, i)] if op == "F" and st > 0 else []
                if op == "B":
                    needs = [("F", st, i)] + ([("B", st + 1, i)] if st < n - 1 else [])
                if any(k not in end for k in needs):
                    break
                start = max([free[r]] + [end[k] for k in needs])
                free[r] = end[(op, st, i)] = start + (cost_f if op == "F" else cost_b)
                pc[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {s.kind} p={p} m={s.m} v={s.v}: the programs wait on each other")
    return max(free)


def work_orders(kind: str, p: int, m: int, v: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(chunk, microbatch) in the order a rank runs its forwards and its backwards."""
    if kind != "interleaved":
        return [(0, i) for i in range(m)], [(0, i) for i in range(m)]
    fwd, bwd = [], []
    for g in range(0, m, p):  # microbatches in groups of p (m % p == 0)
        group = range(g, g + p)
        fwd += [(c, i) for c in range(v) for i in group]
        bwd += [(c, i) for c in reversed(range(v)) for i in group]
    return fwd, bwd


def warmup_forwards(kind: str, p: int, m: int, v: int, rank: int) -> int:
    """Forwards a rank runs before its first backward (Megatron-LM's num_warmup_microbatches)."""
    total = m * v
    if kind == "afab":
        return total
    if kind == "1f1b":
        return min(p - rank - 1, total)
    return min(2 * (p - rank - 1) + (v - 1) * p, total)


def rank_program(kind: str, p: int, m: int, v: int, rank: int) -> list[tuple[str, int, int]]:
    """The ops of one rank in order: warm-up forwards, then one forward / one backward, then cool-down."""
    fwd, bwd = work_orders(kind, p, m, v)
    w = warmup_forwards(kind, p, m, v, rank)
    ops = [("F", *f) for f in fwd[:w]]
    for f, b in zip(fwd[w:], bwd):  # steady state
        ops += [("F", *f), ("B", *b)]
    ops += [("B", *b) for b in bwd[len(fwd) - w:]]  # cool-down
    return ops


def build_schedule(kind: str, p: int, m: int, v: int = 1) -> Schedule:
    """Run every rank's program slot by slot: a rank runs its next op as soon as its input has arrived."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    v = v if kind == "interleaved" else 1
    n = p * v
    programs = [rank_program(kind, p, m, v, r) for r in range(p)]
    pc = [0] * p
    done: dict[tuple[str, int, int], int] = {}  # (op, stage, microbatch) -> slot it ran in
    forward: list[list[Work]] = []
    backward: list[list[Work]] = []
    while any(pc[r] < len(programs[r]) for r in range(p)):
        t = len(forward)
        if t > 4 * (m * v + n) + 8:
            raise RuntimeError(f"schedule {kind} p={p} m={m} v={v} does not finish (deadlock)")
        f_row: list[Work] = [None] * p
        b_row: list[Work] = [None] * p
        for r in range(p):
            if pc[r] == len(programs[r]):
                continue
            op, c, i = programs[r][pc[r]]
            s = c * p + r
            if op == "F":
                ready = s == 0 or done.get(("F", s - 1, i), t) < t
            else:
                ready = done.get(("F", s, i), t) < t and (s == n - 1 or done.get(("B", s + 1, i), t) < t)
            if ready:
                (f_row if op == "F" else b_row)[r] = (c, i)
        for r in range(p):
            for op, row in (("F", f_row), ("B", b_row)):
                if row[r] is not None:
                    done[(op, row[r][0] * p + r, row[r][1])] = t
                    pc[r] += 1
        forward.append(f_row)
        backward.append(b_row)
    sched = Schedule(kind, p, m, v, forward, backward)
    _assign_buffers(sched)
    return sched


class _SlotPool:
    """Buffer indices handed out lowest-first; the peak is the buffer size a rank needs."""

    def __init__(self):
        self.free: list[int] = []
        self.size = 0
        self.owner: dict[tuple[int, int], int] = {}

    def take(self, key: tuple[int, int]) -> int:
        if self.free:
            self.free.sort()
            k = self.free.pop(0)
        else:
            k, self.size = self.size, self.size + 1
        self.owner[key] = k
        return k

    def give(self, key: tuple[int, int]) -> int:
        k = self.owner.pop(key)
        self.free.append(k)
        return k


TABLES = (
    "f_on", "f_chunk", "f_mb", "f_buf", "f_first", "f_last", "f_gbuf",
    "b_on", "b_chunk", "b_mb", "b_buf", "b_gbuf", "b_first",
    "recv_act_on", "recv_act_buf", "recv_grad_on", "recv_grad_buf",
)


def _assign_buffers(s: Schedule) -> None:
    """Fill `s.tables`: for every slot and rank, what to run and which buffer entries it reads/writes.

    Within a slot the executor runs F, then B, then exchanges with its neighbours and stores what
    arrived; an entry freed by this slot's B can take this slot's arrival."""
    p, n, S = s.p, s.num_stages, s.num_slots
    t_ = {name: np.zeros((S, p), np.int32) for name in TABLES}
    acts = [_SlotPool() for _ in range(p)]
    grads = [_SlotPool() for _ in range(p)]
    for t in range(S):
        for r in range(p):
            if (work := s.forward[t][r]) is not None:
                c, i = work
                st = s.stage(r, c)
                key = (c, i)
                k = acts[r].take(key) if st == 0 else acts[r].owner[key]
                t_["f_on"][t, r], t_["f_chunk"][t, r], t_["f_mb"][t, r], t_["f_buf"][t, r] = 1, c, i, k
                t_["f_first"][t, r], t_["f_last"][t, r] = st == 0, st == n - 1
                if st == n - 1:  # the loss's gradient, for this microbatch's B
                    t_["f_gbuf"][t, r] = grads[r].take(key)
            if (work := s.backward[t][r]) is not None:
                c, i = work
                st = s.stage(r, c)
                t_["b_on"][t, r], t_["b_chunk"][t, r], t_["b_mb"][t, r] = 1, c, i
                t_["b_buf"][t, r] = acts[r].give((c, i))
                t_["b_gbuf"][t, r] = grads[r].give((c, i))
                t_["b_first"][t, r] = st == 0
        for r in range(p):  # arrivals at the end of the slot
            prev, nxt = (r - 1) % p, (r + 1) % p
            if (work := s.forward[t][prev]) is not None:
                c, i = work
                st = s.stage(prev, c)
                if st < n - 1:  # stage st+1 lives on rank r, chunk (st+1) // p
                    key = ((st + 1) // p, i)
                    t_["recv_act_on"][t, r], t_["recv_act_buf"][t, r] = 1, acts[r].take(key)
            if (work := s.backward[t][nxt]) is not None:
                c, i = work
                st = s.stage(nxt, c)
                if st > 0:
                    key = ((st - 1) // p, i)
                    t_["recv_grad_on"][t, r], t_["recv_grad_buf"][t, r] = 1, grads[r].take(key)
    s.tables = t_
    s.act_slots = max(max(a.size for a in acts), 1)
    s.grad_slots = max(max(g.size for g in grads), 1)


def render(s: Schedule) -> str:
    """Plain-text time x rank table: `F3` forward of microbatch 3, `B1` backward, `F3B1` both, `.` idle.
    With virtual stages, a letter names the chunk (`F3b`: microbatch 3 through chunk 1)."""

    def cell(w: Work, op: str) -> str:
        if w is None:
            return ""
        c, i = w
        return f"{op}{i}" + (chr(ord("a") + c) if s.v > 1 else "")

    cells = [[cell(f, "F") + cell(b, "B") or "." for f, b in zip(s.forward[t], s.backward[t])]
             for t in range(s.num_slots)]
    width = max(len(c) for row in cells for c in row)
    lines = [f"schedule {s.kind}: p={s.p} pipe ranks, m={s.m} microbatches"
             + (f", v={s.v} chunks per rank" if s.v > 1 else "") + f", {s.num_slots} slots"]
    lines.append("slot   " + " ".join(f"{t:>{width}}" for t in range(s.num_slots)))
    for r in range(s.p):
        lines.append(f"rank {r} " + " ".join(f"{cells[t][r]:>{width}}" for t in range(s.num_slots)))
    lines.append(
        f"bubble {s.bubble_fraction():.3f} counted ({s.idle_slots()} of {s.num_slots * s.p} rank-slots idle), "
        f"{s.analytic_bubble_fraction():.3f} analytic; at most {max(s.max_in_flight())} microbatch-chunks in flight "
        f"(forwarded, not yet backwarded) per rank"
    )
    return "\n".join(lines)


def schedule_of_config(cfg, pipe: int | None = None) -> Schedule:
    """The schedule a run config produces (`pipe`: the resolved mesh.pipe; default the config's)."""
    from picotron_jax.config_checks import validate_pipeline
    from picotron_jax.errors import UserError

    pipe = cfg.mesh.pipe if pipe is None else pipe
    if pipe == -1:
        raise UserError("config field 'mesh.pipe' = -1 (fill): give the number of pipeline stages to print "
                        "their schedule, e.g. mesh.pipe=4")
    if pipe < 2:
        raise UserError(f"config field 'mesh.pipe' = {pipe}: a pipeline schedule needs mesh.pipe >= 2 "
                        f"(and pipeline.schedule = afab, 1f1b or interleaved)")
    validate_pipeline(cfg, pipe)
    pc = cfg.pipeline
    return build_schedule(pc.schedule, pipe, pc.microbatches, pc.virtual_stages)


def schedule_report(s: Schedule, cost_b: float = 2.0) -> dict:
    """Bubble and memory bound of a schedule, for the train log and `picotron-jax bench` (`cost_b`: one B in
    F's, `backward_cost`)."""
    return {
        "schedule": s.kind, "pipe": s.p, "microbatches": s.m, "virtual_stages": s.v, "slots": s.num_slots,
        "bubble_counted": s.bubble_fraction(), "bubble_analytic": s.analytic_bubble_fraction(),
        "max_in_flight": max(s.max_in_flight()),
        **{f"idle_{k}": v for k, v in idle_share(s, 1.0, cost_b).items()}, "idle_cost_b": cost_b,  # time-weighted
    }
