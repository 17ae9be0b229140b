"""The analytic step-time model that ranks compiled candidates without running them.

    step_s = compute_s + bubble_s + sum over collectives (latency_s + bytes / bandwidth[axis])

- compute_s: the step's matmul FLOPs per device (memory/flops.py: loops by trip count, remat
  recomputation included) at the device's measured matmul rate. A pipeline's step is one scan over
  the schedule's time slots whose body holds a forward and a backward under `lax.cond`, so its
  counted FLOPs are slots x (F + B), while a rank really runs m·v forwards and backwards: the busy
  FLOPs are FLOPs x busy_share with busy_share = m·v / slots (AFAB scans only its forward phase and
  differentiates it: slots = that phase's length). On dedicated devices the idle slots
  (`Schedule.bubble_fraction`) add bubble_s = busy / (1 - bubble) - busy; virtual XLA:CPU devices
  share the host's cores, an idle rank frees them for the others, so there bubble_s = 0.
- collectives: each collective instruction of the optimized HLO, times its computation's trip
  count, at the bandwidth of the slowest mesh axis its device groups span (all on one host: the
  measured one; a target YAML gives one per axis).

`Hardware` comes from `measure_hardware` (short micro-benchmarks on the devices here) or
`load_target` (a YAML describing a cluster that is not here: the ranking is then a prediction).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from picotron_jax.config import MESH_AXES
from picotron_jax.errors import UserError
from picotron_jax.observe.hlo import computation_runs, device_groups, instruction_collective, parse_hlo
from picotron_jax.profile.program import mesh_axes_of


@dataclass
class Hardware:
    flops_per_s: float  # matmul FLOP/s of one device (while all devices run at once)
    bandwidth: dict[str, float]  # bytes/s per mesh axis for a collective spanning it
    latency_s: float = 0.0  # fixed cost of one collective
    memory_bytes: int = 0  # per-device memory (0: unknown)
    shared_host: bool = False  # virtual devices sharing one host's cores: no bubble cost
    source: str = "measured"
    # XLA:CPU terms (0: left out, as for a target cluster): what the thunks write, per thunk dispatched,
    # and the collectives' host copies (tune/work.py, Collectives.copy_bytes) instead of per-axis links
    write_bytes_per_s: float = 0.0
    thunk_s: float = 0.0
    copy_bytes_per_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Collectives:
    """Per-device collective traffic of one step: bytes and launches per spanned axis set."""

    bytes_by_axes: dict[str, int] = field(default_factory=dict)  # "data,tensor" -> bytes
    count_by_axes: dict[str, int] = field(default_factory=dict)
    # what the collectives copy on one host: a reducing collective (all-reduce, reduce-scatter) reads
    # each of its group's g buffers, the others copy their bytes once
    copy_bytes: int = 0


def collectives_by_axes(hlo_text: str, mesh_shape: tuple[int, ...]) -> Collectives:
    """Walk the optimized HLO: every collective's bytes x its trip count, keyed by the axes it spans."""
    comps, entry = parse_hlo(hlo_text)
    runs = computation_runs(comps, entry)
    out = Collectives()
    for cname, comp in comps.items():
        if cname not in runs:
            continue
        for ins in comp.instrs:
            coll = instruction_collective(ins, comp)
            if coll is None or coll[1] == 0:
                continue
            groups = device_groups(ins.raw_attrs)
            key = ",".join(mesh_axes_of(groups, mesh_shape)) or "none"
            out.bytes_by_axes[key] = out.bytes_by_axes.get(key, 0) + coll[1] * runs[cname]
            out.count_by_axes[key] = out.count_by_axes.get(key, 0) + runs[cname]
            reads = max((len(g) for g in groups), default=1) if coll[0] in ("all-reduce", "reduce-scatter") else 1
            out.copy_bytes += coll[1] * reads * runs[cname]
    return out


def axis_bandwidth(hw: Hardware, axes_key: str) -> float:
    """The slowest link among the spanned axes (a collective moves at its slowest hop)."""
    axes = [a for a in axes_key.split(",") if a in MESH_AXES] or list(MESH_AXES)
    return min(hw.bandwidth[a] for a in axes)


def predict_step(flops: float, coll: Collectives, bubble: float, hw: Hardware,
                 busy_share: float = 1.0, work: dict | None = None) -> dict[str, float]:
    """Predicted seconds per step, with its terms (`busy_share`, `bubble`: 1 and 0 without a pipeline;
    `work`: tune/work.py's thunk counts, priced when `hw` has the XLA:CPU rates)."""
    work = work or {}
    compute_s = flops * busy_share / hw.flops_per_s
    bubble_s = 0.0 if hw.shared_host else compute_s * bubble / (1.0 - bubble)
    if hw.copy_bytes_per_s > 0:
        comm_s = coll.copy_bytes / hw.copy_bytes_per_s
    else:
        comm_s = sum(b / axis_bandwidth(hw, k) for k, b in coll.bytes_by_axes.items())
    latency_s = hw.latency_s * sum(coll.count_by_axes.values())
    write_s = work.get("thunk_bytes", 0) * busy_share / hw.write_bytes_per_s if hw.write_bytes_per_s > 0 else 0.0
    dispatch_s = work.get("thunks", 0) * busy_share * hw.thunk_s
    return {"step_s": compute_s + bubble_s + comm_s + latency_s + write_s + dispatch_s, "compute_s": compute_s,
            "bubble_s": bubble_s, "comm_s": comm_s, "latency_s": latency_s, "write_s": write_s,
            "dispatch_s": dispatch_s}


def pipeline_shares(sched) -> tuple[float, float]:
    """(bubble fraction, busy share) of a pipeline schedule (parallel/pipeline_schedule.py), as above."""
    slots = sched.num_slots
    if sched.kind == "afab":
        slots = 1 + max(t for t in range(sched.num_slots) if any(w is not None for w in sched.forward[t]))
    return sched.bubble_fraction(), sched.m * sched.v / slots


def load_target(path: str | Path) -> Hardware:
    """A cluster description: peak_flops (per device), mfu (the fraction of peak reached, default 0.4),
    device_memory (bytes or '80GiB'), latency_s, and bandwidth per mesh axis in bytes/s
    (e.g. tensor: 450e9 for NVLink, data: 50e9 for InfiniBand; missing axes take `default_bandwidth`)."""
    from picotron_jax.units import parse_bytes

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--target {path!r}: no such file (see meshes/targets/8xh100.yaml)")
    raw = yaml.safe_load(p.read_text()) or {}
    for key in ("peak_flops", "bandwidth"):
        if key not in raw:
            raise UserError(f"--target {path}: missing field {key!r} (see meshes/targets/8xh100.yaml)")
    bw = raw["bandwidth"] or {}
    if bad := [a for a in bw if a not in MESH_AXES]:
        raise UserError(f"--target {path}: bandwidth.{bad[0]} is not a mesh axis; axes are {', '.join(MESH_AXES)}")
    default = float(raw.get("default_bandwidth", min(map(float, bw.values())) if bw else 0))
    if default <= 0:
        raise UserError(f"--target {path}: give bandwidth per mesh axis (bytes/s) or default_bandwidth")
    mem = raw.get("device_memory", 0)
    return Hardware(flops_per_s=float(raw["peak_flops"]) * float(raw.get("mfu", 0.4)),
                    bandwidth={a: float(bw.get(a, default)) for a in MESH_AXES},
                    latency_s=float(raw.get("latency_s", 10e-6)),
                    memory_bytes=parse_bytes(str(mem)) if isinstance(mem, str) else int(mem),
                    shared_host=False, source=f"target {p.name} (predicted, not measured)")


def _timed(fn, *args, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure_hardware(devices: list, matmul: int = 256, psum_bytes: int = 1 << 20, write_bytes: int = 1 << 22,
                     thunk_loop: int = 2000) -> Hardware:
    """Micro-benchmarks on `devices`, all at once (so on one host they share its cores as a step does):
    a matmul per device (FLOP/s), an all-reduce of `psum_bytes` per device (bytes/s, the same on every
    axis: one host; and as host copy rate of its g·S copy bytes) and of 4 bytes (latency), an elementwise
    op writing `write_bytes` (write rate), and a loop of `thunk_loop` tiny steps (seconds per thunk)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    sharded = NamedSharding(mesh, P("d"))
    a = jax.device_put(jnp.ones((n, matmul, matmul), jnp.float32), sharded)
    mm = jax.jit(lambda x: jnp.einsum("nij,njk->nik", x, x), out_shardings=sharded)
    rate = 2.0 * matmul**3 / _timed(mm, a)

    def allreduce(elems: int) -> float:
        x = jax.device_put(jnp.ones((n, elems), jnp.float32), sharded)
        f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P("d")))
        return _timed(f, x)

    latency = allreduce(1) if n > 1 else 0.0
    t = allreduce(psum_bytes // 4) if n > 1 else 1.0
    bw = psum_bytes / max(t - latency, 1e-9)

    w = jax.device_put(jnp.ones((n, write_bytes // 4), jnp.float32), sharded)
    write_rate = write_bytes / _timed(jax.jit(lambda x: x * 1.5 + 1.0, out_shardings=sharded), w)

    def tiny_loop(v):  # one fusion and the loop's condition per iteration: two thunks
        return jax.lax.fori_loop(0, thunk_loop, lambda i, y: y * 0.5 + 1.0, v)

    small = jax.device_put(jnp.ones((n, 8), jnp.float32), sharded)
    thunk_s = _timed(jax.jit(tiny_loop, out_shardings=sharded), small) / (2 * thunk_loop)
    cpu = devices[0].platform == "cpu"
    return Hardware(flops_per_s=rate, bandwidth={a: bw for a in MESH_AXES}, latency_s=latency,
                    shared_host=cpu, write_bytes_per_s=write_rate if cpu else 0.0, thunk_s=thunk_s if cpu else 0.0,
                    copy_bytes_per_s=bw * n if cpu and n > 1 else 0.0,
                    source=f"measured on {n} {devices[0].platform} device(s)")
