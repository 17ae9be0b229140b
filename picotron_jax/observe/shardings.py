"""How a tree of arrays is laid out on the mesh: one row per array (`Trainer.shardings()`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax

from picotron_jax.observe.metrics import human_bytes


@dataclass(frozen=True)
class ShardingRow:
    path: str  # e.g. "layers.wq"
    shape: tuple[int, ...]  # global shape
    dtype: str
    spec: str  # the PartitionSpec, e.g. "P(None, 'data', 'tensor', None)"
    device_shape: tuple[int, ...]  # the shard one device holds
    bytes_per_device: int


class ShardingTable(list):
    """A list of ShardingRow that prints as a table (and renders as Markdown in Jupyter)."""

    HEADER = ("parameter", "global shape", "dtype", "partition spec", "per device", "bytes/device")

    def _cells(self) -> list[tuple[str, ...]]:
        return [(r.path, "x".join(map(str, r.shape)) or "()", r.dtype, r.spec,
                 "x".join(map(str, r.device_shape)) or "()", human_bytes(r.bytes_per_device)) for r in self]

    def total_bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self)

    def __str__(self) -> str:
        rows = [self.HEADER, *self._cells()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total per device: {human_bytes(self.total_bytes_per_device())}")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        head = "| " + " | ".join(self.HEADER) + " |\n|" + "---|" * len(self.HEADER) + "\n"
        body = "".join("| " + " | ".join(f"`{c}`" if i == 3 else c for i, c in enumerate(r)) + " |\n"
                       for r in self._cells())
        return head + body + f"\ntotal per device: {human_bytes(self.total_bytes_per_device())}\n"


def sharding_table(tree) -> ShardingTable:
    """Rows for every array of `tree` (jax.Arrays or ShapeDtypeStructs carrying a sharding)."""
    rows = ShardingTable()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = x.sharding
        shard = sharding.shard_shape(x.shape)
        spec = getattr(sharding, "spec", None)
        rows.append(ShardingRow(jax.tree_util.keystr(path, simple=True, separator="."), tuple(x.shape),
                                str(x.dtype), str(spec) if spec is not None else str(sharding), tuple(shard),
                                math.prod(shard) * x.dtype.itemsize))
    return rows
