"""Collective traffic of a compiled XLA program, read from its optimized HLO text.

Usage::

    text = jax.jit(step).lower(*args).compile().as_text()
    collective_bytes(text)   # {"all-reduce": 4096, "all-gather": 0, ...}
    collective_stats(text)   # {"bytes": {...}, "counts": {...}, "unknown_trip_counts": 0}

Numbers are per device and per execution of the program. After SPMD partitioning every
shape in the HLO is already the per-device shard, so nothing is divided or multiplied by
the device count.

Size convention (nccl-tests' data size S, the size that the bus-bandwidth formulas use):

* ``all-reduce``: the tensor size (operand == result);
* ``all-gather``: the gathered (output) size;
* ``reduce-scatter``: the input size;
* ``all-to-all``, ``collective-permute``, ``collective-broadcast``: the tensor size;

i.e. max(operand bytes, result bytes). ``collective-permute`` uses its result alone (its
in-place form takes the output buffer and offsets as extra operands). ``ragged-all-to-all``
uses max(first operand, result): an upper bound, since the sizes actually sent are runtime
values. Tuple shapes (combined collectives, the tuple form of ``all-to-all``) are summed.

Async pairs ``X-start`` / ``X-done`` (and ``X-update``) count once, at the ``-start``. The
``-start`` result bundles buffers; only the output part is taken as the result, e.g.
``all-gather-start -> (operand, output)``, ``collective-permute-start -> (operand, output,
u32[], u32[])``, ``reduce-scatter-start -> ((operand), output)``, ``all-reduce-start ->
output``. A generic ``async-start(..), calls=%c`` is followed into ``%c`` once;
``async-update`` / ``async-done`` are not followed.

Execution counts come from the call graph starting at ENTRY:

* ``while``: the body runs ``n`` times and the condition ``n + 1`` times, where ``n`` is
  ``backend_config={..."known_trip_count":{"n":"5"}}`` (what XLA prints for a
  ``jax.lax.scan`` / ``fori_loop`` with static bounds). Without it the loop is counted as
  running once and, if it contains collectives, is reported in ``unknown_trip_counts``.
* ``conditional`` (``branch_computations={..}`` or ``true_computation=`` /
  ``false_computation=``): only the branch moving the most bytes is counted (an upper bound
  for one execution; which branch runs is a runtime value).
* every other computation reference (``calls=`` of fusions, ``to_apply=`` of ``call`` and
  reducers, ``called_computations=``, ...): once per execution of the calling instruction.

Not counted: ``send`` / ``recv`` and custom-call collectives (e.g. NCCL custom calls).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from picotron_jax.observe.hlo_shapes import (
    _is_context,
    _parse_shape,
    _tree_bytes,
)

MAIN_KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
EXTRA_KINDS: tuple[str, ...] = ("ragged-all-to-all", "collective-broadcast")
KINDS: tuple[str, ...] = MAIN_KINDS + EXTRA_KINDS


_INSTR_RE = re.compile(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", re.S)
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*(?:->.*)?\{$")
_OPCODE_RE = re.compile(r"\s*([a-z][\w\-]*)\s*\(")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_COMMENT_RE = re.compile(r"/\*.*?\*/", re.S)
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_CALL_ATTRS = (
    "to_apply",
    "calls",
    "body",
    "condition",
    "true_computation",
    "false_computation",
    "branch_computations",
    "called_computations",
    "select",
    "scatter",
    "comparator",
)
_REF_RE = re.compile(r"\b(" + "|".join(_CALL_ATTRS) + r")=(\{[^}]*\}|%?[\w.\-]+)")


# ----------------------------------------------------------------------------- parsing


@dataclass
class _Instr:
    name: str
    shape: Any  # parsed shape tree
    opcode: str
    operands: list[tuple[str, Any]]  # (name, shape tree or None)
    attrs: str  # attribute text with quoted strings removed
    raw_attrs: str


@dataclass
class _Comp:
    name: str
    instrs: list[_Instr] = field(default_factory=list)
    shapes: dict[str, Any] = field(default_factory=dict)


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def _match_paren(s: str, i: int) -> int:
    """Index just past the ')' matching the '(' at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def _parse_instr(text: str) -> _Instr | None:
    m = _INSTR_RE.match(text.strip())
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    shape, i = _parse_shape(rest)
    om = _OPCODE_RE.match(rest, i)
    if not om:
        return None
    opcode = om.group(1)
    start = om.end() - 1
    end = _match_paren(rest, start)
    operands = []
    for tok in _split_top(_COMMENT_RE.sub("", rest[start + 1 : end - 1])):
        tok = tok.strip()
        if not tok:
            continue
        if "%" in tok:
            head, _, oname = tok.rpartition("%")
        else:
            head, _, oname = tok.rpartition(" ")
        oshape = _parse_shape(head)[0] if "[" in head else None
        operands.append((oname.strip(), oshape))
    raw = rest[end:]
    return _Instr(name, shape, opcode, operands, _STRING_RE.sub('""', raw), raw)


def _parse_module(text: str) -> tuple[dict[str, _Comp], str | None]:
    comps: dict[str, _Comp] = {}
    entry = last = None
    cur: _Comp | None = None
    pending: list[str] = []

    def flush() -> None:
        if cur is not None and pending:
            ins = _parse_instr(" ".join(pending))
            if ins is not None:
                cur.instrs.append(ins)
                cur.shapes[ins.name] = ins.shape
        pending.clear()

    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if cur is None:
            if s.startswith("HloModule"):
                continue
            hm = _HEADER_RE.match(s)
            if hm and not _INSTR_RE.match(s):
                cur = comps.setdefault(hm.group(2), _Comp(hm.group(2)))
                last = cur.name
                if hm.group(1):
                    entry = cur.name
            continue
        if s.startswith("}") and not _pending_is_open(pending):
            flush()
            cur = None
            continue
        if _starts_instr(s) and not _pending_is_open(pending):
            flush()
        pending.append(s)
    flush()
    return comps, entry or last


def _starts_instr(s: str) -> bool:
    """``[ROOT] %name = SHAPE opcode(`` -- not an ``attr=value`` continuation line."""
    m = _INSTR_RE.match(s)
    if not m:
        return False
    rest = m.group(2)
    _, i = _parse_shape(rest)
    return i > 0 and _OPCODE_RE.match(rest, i) is not None


def _pending_is_open(pending: list[str]) -> bool:
    """True while the buffered instruction text still has unbalanced brackets."""
    if not pending:
        return False
    text = _STRING_RE.sub("", " ".join(pending))
    return sum(text.count(c) for c in "([{") > sum(text.count(c) for c in ")]}")


# ----------------------------------------------------------------------------- sizes


def _operand_bytes(ins: _Instr, comp: _Comp, only_first: bool = False) -> int:
    ops = ins.operands[:1] if only_first else ins.operands
    total = 0
    for oname, oshape in ops:
        tree = oshape if oshape is not None else comp.shapes.get(oname, [])
        total += _tree_bytes(tree)
    return total


def _async_output(kind: str, shape: Any) -> tuple[int | None, int]:
    """(operand bytes or None, output bytes) of an X-start result bundle."""
    if not isinstance(shape, list) or kind == "all-reduce":
        return None, _tree_bytes(shape)
    elems = list(shape)
    if elems and isinstance(elems[0], list):  # ((operands...), output(s), [context])
        ops, outs = elems[0], elems[1:]
        while len(outs) > 1 and _is_context(outs[-1]):
            outs.pop()
        return _tree_bytes(ops), _tree_bytes(outs)
    # (operand(s)..., output(s)..., [u32[] context scalars])
    while len(elems) > 2 and _is_context(elems[-1]):
        elems.pop()
    if len(elems) % 2 == 0:
        half = len(elems) // 2
        return _tree_bytes(elems[:half]), _tree_bytes(elems[half:])
    return None, _tree_bytes(elems)


def _collective(ins: _Instr, comp: _Comp) -> tuple[str, int] | None:
    op = ins.opcode
    if op in KINDS:
        kind, is_start = op, False
    elif op.endswith("-start") and op[: -len("-start")] in KINDS:
        kind, is_start = op[: -len("-start")], True
    else:
        return None
    if is_start:
        op_bytes, out_bytes = _async_output(kind, ins.shape)
        if op_bytes is None:
            op_bytes = _operand_bytes(ins, comp, only_first=kind == "ragged-all-to-all")
    else:
        out_bytes = _tree_bytes(ins.shape)
        op_bytes = _operand_bytes(ins, comp, only_first=kind == "ragged-all-to-all")
    if _moves_nothing(ins.raw_attrs):
        return kind, 0
    if kind == "collective-permute":
        return kind, out_bytes
    return kind, max(op_bytes, out_bytes)


_GROUPS_LIST_RE = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS_RE = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _moves_nothing(attrs: str) -> bool:
    """True for a collective whose every group is one device (e.g. a psum over a size-1 mesh
    axis: `replica_groups={{0}}`) or a permute that only sends devices to themselves."""
    m = _GROUPS_LIST_RE.search(attrs)
    if m and m.group(1).strip():
        groups = re.findall(r"\{([\d,\s]*)\}", m.group(1))
        return all(len([x for x in g.split(",") if x.strip()]) <= 1 for g in groups)
    m = _GROUPS_IOTA_RE.search(attrs)
    if m:
        return int(m.group(2)) == 1
    m = _GROUPS_MESH_RE.search(attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        axes = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes.get(a, 1)) for a in axes) == 1
    m = _PAIRS_RE.search(attrs)
    if m and m.group(1):
        pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1))
        return all(a == b for a, b in pairs)
    return False


# ----------------------------------------------------------------------------- call graph


def _refs(ins: _Instr, comps: dict[str, _Comp]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, val in _REF_RE.findall(ins.attrs):
        names = [v.strip().lstrip("%") for v in val.strip("{}").split(",")]
        out.setdefault(key, []).extend(n for n in names if n in comps)
    return out


class _Cost:
    __slots__ = ("bytes", "counts", "unknown")

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(KINDS, 0)
        self.counts = dict.fromkeys(KINDS, 0)
        self.unknown: set[tuple[str, str]] = set()

    def add(self, other: _Cost, times: int = 1) -> None:
        for k in KINDS:
            self.bytes[k] += other.bytes[k] * times
            self.counts[k] += other.counts[k] * times
        self.unknown |= other.unknown

    def total(self) -> int:
        return sum(self.bytes.values())

    def any(self) -> bool:
        return any(self.counts.values())


def _cost(name: str, comps: dict[str, _Comp], memo: dict[str, _Cost]) -> _Cost:
    if name in memo:
        return memo[name]
    memo[name] = _Cost()  # guards against (invalid) cycles
    comp, cost = comps[name], _Cost()
    for ins in comp.instrs:
        coll = _collective(ins, comp)
        if coll is not None:
            cost.bytes[coll[0]] += coll[1]
            cost.counts[coll[0]] += 1
        op = ins.opcode
        if op == "async-done" or op == "async-update" or op.endswith(("-done", "-update")):
            continue
        refs = _refs(ins, comps)
        if op == "while":
            m = _TRIP_RE.search(ins.raw_attrs)
            inner = _Cost()
            for b in refs.get("body", []):
                inner.add(_cost(b, comps, memo), int(m.group(1)) if m else 1)
            for c in refs.get("condition", []):
                inner.add(_cost(c, comps, memo), int(m.group(1)) + 1 if m else 1)
            if m is None and inner.any():
                inner.unknown.add((name, ins.name))
            cost.add(inner)
        elif op == "conditional":
            branches = refs.get("branch_computations", []) + refs.get("true_computation", [])
            branches += refs.get("false_computation", [])
            costs = [_cost(b, comps, memo) for b in branches]
            if costs:
                cost.add(max(costs, key=lambda c: (c.total(), sum(c.counts.values()))))
            for c in costs:  # a loop of unknown length in any branch stays visible
                cost.unknown |= c.unknown
        else:
            for names in refs.values():
                for c in names:
                    cost.add(_cost(c, comps, memo))
    memo[name] = cost
    return cost


# ----------------------------------------------------------------------------- API


def collective_stats(hlo_text: str) -> dict[str, Any]:
    """Collective bytes and execution counts per kind, per device, per program execution.

    Returns ``{"bytes": {kind: int}, "counts": {kind: int}, "unknown_trip_counts": int}``.
    ``bytes``/``counts`` always hold the five main kinds (0 when absent) plus
    ``ragged-all-to-all`` / ``collective-broadcast`` when the program has them.
    ``unknown_trip_counts`` is the number of ``while`` loops (reachable from ENTRY, holding
    collectives) without a known trip count; each was counted as running once.
    ``hlo_text`` may also be a compiled object with ``.as_text()``.
    """
    if not isinstance(hlo_text, str):
        hlo_text = hlo_text.as_text()
    comps, entry = _parse_module(hlo_text)
    cost = _cost(entry, comps, {}) if entry is not None else _Cost()
    keep = [k for k in KINDS if k in MAIN_KINDS or cost.counts[k]]
    return {
        "bytes": {k: cost.bytes[k] for k in keep},
        "counts": {k: cost.counts[k] for k in keep},
        "unknown_trip_counts": len(cost.unknown),
    }


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes moved per device by each collective kind in one execution (see module doc)."""
    return collective_stats(hlo_text)["bytes"]


# ----------------------------------------------------------------------------- per-instruction API
# For tools that join the compiled program to a trace (picotron_jax/profile): the parsed module,
# how often each computation runs, and each collective's kind, bytes and device groups.


def parse_hlo(hlo_text: str) -> tuple[dict[str, Any], str | None]:
    """(computations by name, entry name) of an optimized HLO module's text. Each computation has
    `instrs` (name, shape, opcode, operands, attrs, raw_attrs) and `shapes`."""
    return _parse_module(hlo_text)


def computation_runs(comps: dict[str, Any], entry: str | None) -> dict[str, int]:
    """How many times each computation reachable from ENTRY runs per program execution: a while body
    its trip count (1 if unknown), every branch of a conditional once (an upper bound), everything
    else once per execution of its caller."""
    runs: dict[str, int] = {}

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 64:
            return
        runs[name] = runs.get(name, 0) + times
        for ins in comps[name].instrs:
            op = ins.opcode
            if op == "async-done" or op == "async-update" or op.endswith(("-done", "-update")):
                continue
            refs = _refs(ins, comps)
            trip = 1
            if op == "while":
                m = _TRIP_RE.search(ins.raw_attrs)
                trip = int(m.group(1)) if m else 1
            for key, names in refs.items():
                for c in names:
                    visit(c, times * (trip if key == "body" else trip + 1 if key == "condition" else 1), depth + 1)

    if entry is not None:
        visit(entry, 1)
    return runs


def instruction_collective(ins: Any, comp: Any) -> tuple[str, int] | None:
    """(kind, bytes per execution) of a collective instruction (sizes as in the module doc), else None."""
    return _collective(ins, comp)


def device_groups(raw_attrs: str) -> list[list[int]]:
    """The device (partition) groups a collective runs over: `replica_groups` in list, iota
    (`[G,S]<=[dims]T(perm)`) or mesh form, or the pairs of a collective-permute."""
    import numpy as np

    m = _GROUPS_LIST_RE.search(raw_attrs)
    if m and m.group(1).strip():
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", raw_attrs)
    if m:
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = _GROUPS_MESH_RE.search(raw_attrs)
    if m:
        sizes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        grouped = re.findall(r"'([^']+)'", m.group(2))
        ids = np.arange(math.prod(n for _, n in sizes)).reshape([n for _, n in sizes] or [1])
        order = [i for i, (a, _) in enumerate(sizes) if a not in grouped] + \
            [i for i, (a, _) in enumerate(sizes) if a in grouped]
        width = math.prod(n for a, n in sizes if a in grouped)
        return ids.transpose(order).reshape(-1, width).tolist()
    m = _PAIRS_RE.search(raw_attrs)
    if m and m.group(1):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    return []
