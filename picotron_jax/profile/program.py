"""The compiled program, instruction by instruction: what the trace's HLO op names stand for.

Every trace event of an XLA op carries the instruction's name (`hlo_op`). The optimized HLO text
(`compiled.as_text()`, parsed by observe/hlo.py) tells, for each instruction: its opcode; for a
collective its kind, bytes and device groups (-> the mesh axes it runs over); its `op_name`
metadata, whose `jax.named_scope` parts name the model module (models/llama.py, models/moe.py,
train/step.py) and whose transformation path tells forward (`jvp`), backward (`transpose`),
recomputation (`rematted_computation`, a remat policy) and the optimizer update apart; and its
FLOPs, counted as XLA's HloCostAnalysis counts them (2 per multiply-add of a dot; one per element of
an elementwise op, transcendentals apart; a reduce one per reduced element and op of its reducer; a
while body once, a conditional's largest branch), so that the modules' FLOPs add up to
`compiled.cost_analysis()["flops"]` (tested). Executed FLOPs come from the trace: each event is one
execution of its instruction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from picotron_jax.config import MESH_AXES
from picotron_jax.observe.hlo import computation_runs, device_groups, instruction_collective, parse_hlo

# named scopes of the model and the step, in the order the report lists them
MODULES = ("embed", "attn_norm", "qkv", "attention", "attn_out", "mlp_norm", "mlp", "moe_router", "moe_dispatch",
           "moe_experts", "moe_combine", "moe_shared", "final_norm", "head", "optimizer", "monitor", "other")
CONTROL = ("while", "conditional", "call", "async-start", "async-done", "async-update")
TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "power", "sqrt", "cbrt",
                  "rsqrt", "tanh", "sine", "cosine", "tan", "atan2", "erf", "acosh"}
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "compare", "select", "clamp", "convert",
               "negate", "abs", "sign", "and", "or", "xor", "not", "remainder", "floor", "ceil", "round-nearest-afz",
               "round-nearest-even", "is-finite", "shift-left", "shift-right-logical", "shift-right-arithmetic",
               "reduce-precision", "real", "imag", "popcnt", "count-leading-zeros", "stochastic-convert"}
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_CONTRACT_RE = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_SCOPE_RE = re.compile(r"[A-Za-z_]+")
_COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                   "ragged-all-to-all", "collective-broadcast")


@dataclass
class Op:
    name: str
    opcode: str
    module: str = "other"
    phase: str = "forward"  # forward | backward | recompute | update
    flops: float = 0.0  # per execution, HloCostAnalysis convention (fusions: their fused instructions)
    xla_weight: int = 1  # how often cost_analysis counts it (0: a conditional branch it does not count)
    runs: int = 1  # executions per step from the loop trip counts (conditionals: an upper bound)
    collective: str = ""  # kind, for collectives
    collective_bytes: int = 0  # per execution
    axes: tuple[str, ...] = ()  # mesh axes a collective runs over
    out_bytes: int = 0
    op_name: str = ""
    control: bool = False  # while / conditional / call: encloses other ops' events
    host_callback: bool = False  # a custom-call into Python (jax.pure_callback / io_callback)
    trip: int = 0  # while ops: the loop's known trip count (0 = unknown)
    loop: str = ""  # the outermost while op whose body (transitively) holds this op ("" = none)


@dataclass
class Program:
    ops: dict[str, Op] = field(default_factory=dict)

    def static_flops(self) -> float:
        """Per-device FLOPs per execution as cost_analysis counts them."""
        return sum(o.flops * o.xla_weight for o in self.ops.values() if not o.control)

    def module_static_flops(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.ops.values():
            if not o.control:
                out[o.module] = out.get(o.module, 0.0) + o.flops * o.xla_weight
        return out


def _elements(shape) -> int:
    from picotron_jax.observe.hlo_shapes import _leaves  # shape trees of HLO types

    total = 0
    for leaf in _leaves(shape):
        if not leaf.dtype or leaf.dtype in ("token", "opaque"):
            continue
        n = 1
        for d in leaf.dims.split(","):
            d = d.strip().lstrip("<=")
            if d:
                n *= int(d) if d.isdigit() else 0
        total += n
    return total


def _dims(shape) -> list[int]:
    from picotron_jax.observe.hlo_shapes import _leaves

    leaf = _leaves(shape)[0]
    return [int(d) for d in leaf.dims.split(",") if d.strip().isdigit()]


class _Flops:
    """HloCostAnalysis-style FLOPs of instructions and computations (memoised per computation)."""

    def __init__(self, comps):
        self.comps = comps
        self.memo: dict[str, float] = {}

    def computation(self, name: str) -> float:
        if name not in self.memo:
            self.memo[name] = 0.0
            comp = self.comps[name]
            self.memo[name] = sum(self.instruction(ins, comp) for ins in comp.instrs)
        return self.memo[name]

    def _called(self, ins, key: str) -> list[str]:
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", ins.attrs)
        if not m:
            return []
        return [v.strip().lstrip("%") for v in m.group(1).strip("{}").split(",") if v.strip().lstrip("%") in self.comps]

    def instruction(self, ins, comp) -> float:
        op = ins.opcode
        if op in ("dot", "ragged-dot"):
            lhs = ins.operands[0][1] if ins.operands and ins.operands[0][1] is not None else \
                comp.shapes.get(ins.operands[0][0])
            m = _CONTRACT_RE.search(ins.attrs)
            if lhs is None or not m:
                return 0.0
            dims = _dims(lhs)
            width = math.prod(dims[int(d)] for d in m.group(1).split(",") if d.strip())
            return 2.0 * _elements(ins.shape) * width
        if op in ELEMENTWISE:
            return float(_elements(ins.shape))
        if op in ("reduce", "reduce-window", "scatter", "all-reduce", "reduce-scatter"):
            sub = sum(self.computation(c) for c in self._called(ins, "to_apply"))
            if op == "reduce":
                first = ins.operands[0][1] if ins.operands[0][1] is not None else comp.shapes.get(ins.operands[0][0])
                out = ins.shape[0] if isinstance(ins.shape, list) else ins.shape
                return sub * max(_elements(first) - _elements(out), 0)
            if op == "scatter":
                upd = ins.operands[-1]
                return sub * _elements(upd[1] if upd[1] is not None else comp.shapes.get(upd[0]))
            return 0.0  # XLA:CPU's cost analysis gives collectives no FLOPs
        if op == "fusion":
            return sum(self.computation(c) for c in self._called(ins, "calls"))
        if op in ("while", "call"):
            keys = ("body", "condition") if op == "while" else ("to_apply",)
            return sum(self.computation(c) for k in keys for c in self._called(ins, k))
        if op == "conditional":
            branches = self._called(ins, "branch_computations") + self._called(ins, "true_computation") + \
                self._called(ins, "false_computation")
            return max((self.computation(c) for c in branches), default=0.0)
        return 0.0


def _module(op_name: str) -> str:
    """The innermost named scope of the model that `op_name` lies in ("other" outside all of them)."""
    found = "other"
    for token in _SCOPE_RE.findall(op_name):
        if token in MODULES:
            found = token
    return found


def _phase(op_name: str, module: str) -> str:
    if module in ("optimizer", "monitor"):  # after the backward pass: the update and the monitor's statistics
        return "update"
    if "rematted_computation" in op_name:
        return "recompute"
    return "backward" if "transpose(" in op_name else "forward"


def mesh_axes_of(groups: list[list[int]], mesh_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The mesh axes along which the members of the groups differ (device i = mesh.devices.flat[i])."""
    varying = set()
    for g in groups:
        if len(g) < 2 or max(g) >= math.prod(mesh_shape):
            continue
        coords = np.array(np.unravel_index(np.asarray(g), mesh_shape)).T
        varying |= {a for a in range(len(mesh_shape)) if len(set(coords[:, a])) > 1}
    return tuple(MESH_AXES[a] for a in sorted(varying))


def build_program(hlo_text: str, mesh_shape: tuple[int, ...]) -> Program:
    comps, entry = parse_hlo(hlo_text)
    runs = computation_runs(comps, entry)
    flops = _Flops(comps)
    # computations whose instructions run as part of a fusion: their fusion op stands for them in the trace
    fused = {c for comp in comps.values() for ins in comp.instrs if ins.opcode == "fusion"
             for c in flops._called(ins, "calls")}
    weights = _xla_weights(comps, entry, flops)
    loops = _enclosing_loops(comps, entry, flops)
    prog = Program()
    for cname, comp in comps.items():
        if cname in fused or cname not in runs:
            continue
        names = _op_names(comp)
        for ins in comp.instrs:
            if ins.opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
                continue
            op_name = names.get(ins.name, "")
            if ins.opcode == "fusion":  # a fusion belongs to the module of its costliest fused instruction
                op_name = _dominant_op_name(comps, flops, flops._called(ins, "calls"), op_name)
            if not op_name:
                op_name = _neighbour_op_name(comp, ins, names)
            module = _module(op_name)
            op = Op(ins.name, ins.opcode, module, _phase(op_name, module), flops.instruction(ins, comp),
                    weights.get(cname, 1), runs.get(cname, 1), op_name=op_name,
                    control=ins.opcode in CONTROL, loop=loops.get(cname, ""))
            from picotron_jax.observe.hlo_shapes import _tree_bytes

            op.out_bytes = _tree_bytes(ins.shape)
            if op.control:
                op.flops = 0.0
            if ins.opcode == "while":
                t = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', ins.raw_attrs)
                op.trip = int(t.group(1)) if t else 0
            if ins.opcode == "custom-call" and "callback" in ins.raw_attrs.split("custom_call_target=")[-1][:80]:
                op.host_callback = True
            coll = instruction_collective(ins, comp)
            if coll is not None:
                op.collective, op.collective_bytes = coll
                op.axes = mesh_axes_of(device_groups(ins.raw_attrs), mesh_shape)
                op.module = module
            prog.ops[ins.name] = op
    return prog


def _op_names(comp) -> dict[str, str]:
    out = {}
    for ins in comp.instrs:
        m = _OP_NAME_RE.search(ins.raw_attrs)
        if m:
            out[ins.name] = m.group(1)
    return out


def _neighbour_op_name(comp, ins, names: dict[str, str]) -> str:
    """Some XLA rewrites (e.g. XLA:CPU's batched-dot split) drop the metadata: take a consumer's
    op_name, else a producer's."""
    by_name = {i.name: i for i in comp.instrs}
    frontier, seen = [ins.name], {ins.name}
    for _ in range(4):  # breadth-first over consumers, then producers
        nxt = []
        for name in frontier:
            users = [u.name for u in comp.instrs if any(o == name for o, _ in u.operands)]
            nxt += [n for n in users + [o for o, _ in by_name[name].operands] if n in by_name and n not in seen]
        for name in nxt:
            if names.get(name) and _module(names[name]) != "other":
                return names[name]
        seen.update(nxt)
        frontier = nxt
    return ""


def _dominant_op_name(comps, flops: _Flops, called: list[str], default: str) -> str:
    best, best_flops = default, -1.0
    for c in called:
        for ins in comps[c].instrs:
            m = _OP_NAME_RE.search(ins.raw_attrs)
            if not m:
                continue
            f = flops.instruction(ins, comps[c])
            if f > best_flops or (best == default and _module(m.group(1)) != "other" and _module(default) == "other"):
                best, best_flops = m.group(1), f
    return best


def _xla_weights(comps, entry, flops: _Flops) -> dict[str, int]:
    """1 for computations cost_analysis counts (once), 0 for conditional branches it skips (all but the
    costliest) and what only they call."""
    weights: dict[str, int] = {}

    def visit(name: str, w: int, depth: int = 0) -> None:
        if depth > 64:
            return
        weights[name] = max(weights.get(name, 0), w)
        for ins in comps[name].instrs:
            if ins.opcode == "conditional":
                branches = flops._called(ins, "branch_computations") + flops._called(ins, "true_computation") + \
                    flops._called(ins, "false_computation")
                best = max(branches, key=flops.computation, default=None)
                for b in branches:
                    visit(b, w if b == best else 0, depth + 1)
                continue
            for key in ("body", "condition", "to_apply", "calls", "called_computations"):
                for c in flops._called(ins, key):
                    visit(c, w, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return weights


def _enclosing_loops(comps, entry, flops: _Flops) -> dict[str, str]:
    """computation -> the outermost while op that runs it (by body or condition), for loop-level timing."""
    out: dict[str, str] = {}

    def visit(name: str, loop: str, depth: int = 0) -> None:
        if depth > 64 or (name in out and out[name]):
            return
        out[name] = loop
        for ins in comps[name].instrs:
            inner = loop or (ins.name if ins.opcode == "while" else "")
            for key in ("body", "condition", "to_apply", "calls", "called_computations", "branch_computations",
                        "true_computation", "false_computation"):
                for c in flops._called(ins, key):
                    visit(c, inner if key in ("body", "condition") or loop else loop, depth + 1)

    if entry is not None:
        visit(entry, "")
    return out
