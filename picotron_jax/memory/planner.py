"""Fit a memory budget: search remat policy x microbatch count x ZeRO stage by compiling only.

Each candidate configuration is compiled for abstract inputs (memory/estimate.py) and ranked by
expected speed without running it: fewest FLOPs first (XLA's `cost_analysis()` counts the
recomputation a remat policy adds), then fewest collective bytes (ZeRO-3 gathers parameters in
every microbatch), then fewest microbatches (larger matmuls, fewer loop trips), then the lower
ZeRO stage. The choice is the fastest candidate whose estimated peak fits the budget
(MaxText's estimator searches remat policy x batch size in the same way).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

from picotron_jax.config import Config, resolve_mesh_shape
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.memory.estimate import MemoryEstimate, estimate_memory, mib

DEFAULT_REMATS = ("none", "dots", "save_attn", "save_qkv", "full")


@dataclass
class Candidate:
    remat: str
    grad_accum: int
    zero_stage: int
    estimate: MemoryEstimate

    @property
    def peak(self) -> int:
        return self.estimate.peak_bytes


def candidate_space(cfg: Config, num_devices: int, remats: Iterable[str] | None = None,
                    accums: Iterable[int] | None = None, zeros: Iterable[int] | None = None) -> list[tuple]:
    """(remat, grad_accum, zero_stage) triples that are valid for this mesh and batch (config validation
    decides: e.g. pipelines take no grad_accum, MoE models no per-layer remat segments)."""
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    batch_ways = sizes["data"] * sizes["expert"]
    B = cfg.train.global_batch
    if accums is None:
        accums = [m for m in (1, 2, 4, 8, 16, 32) if B % m == 0 and (B // m) % batch_ways == 0]
    if zeros is None:
        zeros = (0, 1, 3) if sizes["data"] > 1 else (0,)  # without a data axis the stages are the same program
    space = [(r, m, z) for r in (remats or DEFAULT_REMATS) for m in accums for z in zeros]
    return [c for c in space if _is_valid(configured(cfg, *c), num_devices)]  # e.g. pipelines: no grad_accum


def _is_valid(cfg: Config, num_devices: int) -> bool:
    try:
        validate(cfg, num_devices)
    except UserError:
        return False
    return True


def speed_key(c: Candidate, min_flops: float) -> tuple:
    return (round(c.estimate.flops / min_flops, 3), c.estimate.collective_bytes, c.grad_accum, c.zero_stage)


def configured(cfg: Config, remat: str, grad_accum: int, zero_stage: int) -> Config:
    out = copy.deepcopy(cfg)
    out.memory.remat, out.train.grad_accum, out.train.zero_stage = remat, grad_accum, zero_stage
    return out


def plan(cfg: Config, devices: list, space: list[tuple], log=None) -> list[Candidate]:
    """Compile every candidate; returns them fastest first."""
    table = []
    for i, (remat, accum, zero) in enumerate(space):
        est = estimate_memory(configured(cfg, remat, accum, zero), devices)
        table.append(Candidate(remat, accum, zero, est))
        if log:
            log(f"[{i + 1}/{len(space)}] remat={remat} grad_accum={accum} zero={zero}: peak {mib(est.peak_bytes)}, "
                f"{est.flops:.4g} flops")
    min_flops = min(c.estimate.flops for c in table)
    return sorted(table, key=lambda c: speed_key(c, min_flops))


def choose(table: list[Candidate], budget: int) -> Candidate | None:
    """The fastest candidate (table is sorted fastest first) whose estimated peak fits."""
    return next((c for c in table if c.peak <= budget), None)


def format_plan(table: list[Candidate], budget: int, choice: Candidate | None) -> str:
    min_flops = min(c.estimate.flops for c in table)
    lines = [f"{'rank':>4}  {'remat':<12} {'accum':>5} {'zero':>4} {'peak':>14} {'temp':>14} {'flops':>8} "
             f"{'collective':>12}  fits {budget / 2**30:.2f} GiB"]
    for i, c in enumerate(table):
        e = c.estimate
        mark = "  <- chosen" if c is choice else ""
        lines.append(f"{i + 1:>4}  {c.remat:<12} {c.grad_accum:>5} {c.zero_stage:>4} {mib(e.peak_bytes):>14} "
                     f"{mib(e.temp_bytes):>14} {e.flops / min_flops:>7.3f}x {mib(e.collective_bytes):>12}  "
                     f"{'yes' if c.peak <= budget else 'no'}{mark}")
    if choice is None:
        lines.append(f"nothing fits {budget / 2**30:.2f} GiB per device: add devices (data/tensor/ZeRO-3) or shorten "
                     f"train.seq_len / train.global_batch")
    else:
        lines.append(f"fastest that fits: memory.remat={choice.remat} train.grad_accum={choice.grad_accum} "
                     f"train.zero_stage={choice.zero_stage} (peak {mib(choice.peak)} per device)")
    return "\n".join(lines)
