"""The layout search space: factorisations of N devices over the five mesh axes x ZeRO stage x remat
policy x microbatches x pipeline schedule, pruned by the config validation (config_checks.py).

The number of ordered factorisations of N = prod p_i^a_i into k factors is prod C(a_i + k - 1, k - 1)
(stars and bars per prime); `count_factorisations` is that closed form, `factorisations` lists them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

from picotron_jax.config import MESH_AXES, Config
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError

DEFAULT_REMATS = ("none", "full")
DEFAULT_SCHEDULES = ("1f1b", "interleaved")


def factorisations(n: int, k: int = len(MESH_AXES)) -> list[tuple[int, ...]]:
    """Every ordered k-tuple of positive integers whose product is n."""
    if k == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorisations(n // d, k - 1)]


def count_factorisations(n: int, k: int = len(MESH_AXES)) -> int:
    """Closed form of len(factorisations(n, k)): prod over the primes of n of C(exponent + k - 1, k - 1)."""
    total, p, rest = 1, 2, n
    while p * p <= rest:
        a = 0
        while rest % p == 0:
            rest, a = rest // p, a + 1
        total *= math.comb(a + k - 1, k - 1)
        p += 1
    return total * (k if rest > 1 else 1)


@dataclass(frozen=True)
class Layout:
    """One candidate: mesh axis sizes and the knobs that trade memory for speed."""

    pipe: int = 1
    data: int = 1
    context: int = 1
    expert: int = 1
    tensor: int = 1
    zero_stage: int = 0
    remat: str = "none"
    grad_accum: int = 1  # train.grad_accum without a pipeline, pipeline.microbatches with one
    schedule: str = "none"
    virtual_stages: int = 2

    @property
    def mesh(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def overrides(self) -> list[str]:
        """`section.key=value` overrides that turn a config into this layout (mesh.num_devices set by `apply`)."""
        out = [f"mesh.{a}={getattr(self, a)}" for a in MESH_AXES]
        out += [f"train.zero_stage={self.zero_stage}", f"memory.remat={self.remat}",
                f"pipeline.schedule={self.schedule}"]
        if self.pipe > 1:
            out += ["train.grad_accum=1", f"pipeline.microbatches={self.grad_accum}",
                    f"pipeline.virtual_stages={self.virtual_stages}"]
        else:
            out.append(f"train.grad_accum={self.grad_accum}")
        return out

    def label(self) -> str:
        mesh = " ".join(f"{a[0]}{getattr(self, a)}" for a in MESH_AXES if getattr(self, a) > 1) or "single"
        extra = f" {self.schedule}" + (f"/v{self.virtual_stages}" if self.schedule == "interleaved" else "") \
            if self.pipe > 1 else ""
        return f"{mesh} zero{self.zero_stage} remat={self.remat} m{self.grad_accum}{extra}"

    def as_dict(self) -> dict:
        return asdict(self)


def apply(cfg: Config, layout: Layout, num_devices: int) -> Config:
    """The config run with this layout on the first `num_devices` devices."""
    return cfg.with_overrides(layout.overrides() + [f"mesh.num_devices={num_devices}"])


def _batch_splits(cfg: Config, accums: Iterable[int] | None) -> list[int]:
    B = cfg.train.global_batch
    return sorted(set(accums)) if accums else [m for m in (1, 2, 4, 8, 16, 32) if B % m == 0]


def enumerate_layouts(cfg: Config, num_devices: int, *, axes: Iterable[str] = MESH_AXES,
                      remats: Iterable[str] = DEFAULT_REMATS, zeros: Iterable[int] = (0, 1, 3),
                      accums: Iterable[int] | None = None,
                      schedules: Iterable[str] = DEFAULT_SCHEDULES) -> tuple[list[Layout], int]:
    """(the candidates config validation accepts, how many it rejected). `axes`: the mesh axes searched
    (the others stay 1). ZeRO stages > 0 only with a data axis (without one they are the same program)."""
    axes = tuple(axes)
    if bad := [a for a in axes if a not in MESH_AXES]:
        raise UserError(f"--axes: {bad[0]!r} is not a mesh axis; axes are {', '.join(MESH_AXES)}")
    if num_devices < 1:
        raise UserError(f"--devices {num_devices}: must be >= 1")
    splits = _batch_splits(cfg, accums)
    valid, rejected = [], 0
    for sizes in factorisations(num_devices, len(axes)):
        mesh = {a: 1 for a in MESH_AXES} | dict(zip(axes, sizes))
        for layout in _knobs(mesh, tuple(remats), tuple(zeros), splits, tuple(schedules)):
            try:
                validate(apply(cfg, layout, num_devices), num_devices)
            except UserError:
                rejected += 1
                continue
            valid.append(layout)
    return valid, rejected


def _knobs(mesh: dict[str, int], remats, zeros, splits, schedules):
    zs = zeros if mesh["data"] > 1 else (0,)
    for z in zs:
        if mesh["pipe"] == 1:
            for r in remats:
                for m in splits:
                    yield Layout(**mesh, zero_stage=z, remat=r, grad_accum=m)
        else:  # the pipeline recomputes each stage's forward itself: no remat policy
            for s in schedules:
                for m in splits:
                    yield Layout(**mesh, zero_stage=z, remat="none", grad_accum=m, schedule=s)
