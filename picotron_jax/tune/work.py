"""What a compiled step makes one XLA:CPU device do besides its matmuls, read from the optimized HLO.

XLA:CPU runs a program as a sequence of thunks: one per top-level instruction of ENTRY, of loop
bodies and of conditional branches (a fusion is one thunk, whatever it holds). Each thunk pays a
fixed dispatch cost, and what it writes is memory traffic that the matmul rate does not see (the
elementwise work of norms, rotary, softmax, the optimizer; the copies and transposes around dots;
the memcpy of a collective between virtual devices of one process). Two counts, per device and
per step, each thunk weighted by how often its computation runs:

- `thunks`: instructions executed (parameters, constants, tuples, bitcasts and other free ops left out);
- `thunk_bytes`: bytes those instructions write (their result shapes).

cost.py turns them into seconds with rates calibrated on the machine (tune/calibrate.py).
"""

from __future__ import annotations

from picotron_jax.observe.hlo import _TRIP_RE, _refs, parse_hlo
from picotron_jax.observe.hlo_shapes import _tree_bytes

# instructions that do not become work at run time
FREE_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                      "partition-id", "replica-id", "opt-barrier", "domain"})
# a conditional's branches (a fusion's `calls` or a reducer's `to_apply` are inside one thunk)
_BRANCH_REFS = ("branch_computations", "true_computation", "false_computation")


def thunk_work(hlo_text: str) -> dict[str, int]:
    """{"thunks": executed top-level instructions, "thunk_bytes": bytes they write} per device per step.
    A conditional counts its costliest branch (which one runs is a runtime value)."""
    comps, entry = parse_hlo(hlo_text)

    def visit(name: str, depth: int = 0) -> tuple[int, int]:
        if depth > 64 or name not in comps:
            return 0, 0
        n = nbytes = 0
        for ins in comps[name].instrs:
            op = ins.opcode
            if op in FREE_OPS or op.endswith(("-done", "-update")):
                continue
            refs = _refs(ins, comps)
            if op == "while":
                m = _TRIP_RE.search(ins.raw_attrs)
                trip = int(m.group(1)) if m else 1
                for key, times in (("body", trip), ("condition", trip + 1)):
                    for c in refs.get(key, []):
                        cn, cb = visit(c, depth + 1)
                        n, nbytes = n + cn * times, nbytes + cb * times
            elif op == "conditional":
                branches = [visit(c, depth + 1) for key in _BRANCH_REFS for c in refs.get(key, [])]
                cn, cb = max(branches, default=(0, 0), key=lambda w: (w[1], w[0]))
                n, nbytes = n + cn, nbytes + cb
            elif op in ("call", "async-start"):
                for c in refs.get("to_apply", []) + refs.get("calls", []):
                    cn, cb = visit(c, depth + 1)
                    n, nbytes = n + cn, nbytes + cb
            else:
                n, nbytes = n + 1, nbytes + _tree_bytes(ins.shape)
        return n, nbytes

    thunks, thunk_bytes = visit(entry) if entry is not None else (0, 0)
    return {"thunks": thunks, "thunk_bytes": thunk_bytes}
