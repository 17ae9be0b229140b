"""Shapes in XLA's HLO text: array types (`f32[8,128]{1,0}`), tuples of them, and their sizes in bytes.

Used by the HLO parser (observe/hlo.py) and the profiler's program model (profile/program.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

_BITS = {"pred": 8, "token": 0, "opaque": 0, "bf16": 16}
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?")


def _dtype_bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    m = re.match(r"[a-z]+(\d+)", dtype)  # f32, s8, u4, c64, f8e4m3fn, f4e2m1fn, ...
    return int(m.group(1)) if m else 0


def _array_bytes(dtype: str, dims: str) -> int:
    n = 1
    for d in dims.split(","):
        d = d.strip().lstrip("<=")
        if not d:
            continue
        n *= int(d) if d.isdigit() else 0  # "?" (unbounded dynamic) counts as 0
    return math.ceil(n * _dtype_bits(dtype) / 8)


class _Leaf(NamedTuple):
    bytes: int
    dtype: str
    dims: str


def _parse_shape(s: str, i: int = 0) -> tuple[Any, int]:
    """Parse a shape at s[i:]. Returns (tree, end): a list for a tuple, else a _Leaf."""
    while i < len(s) and s[i].isspace():
        i += 1
    if i < len(s) and s[i] == "(":
        i += 1
        elems: list[Any] = []
        while True:
            while i < len(s) and (s[i].isspace() or s[i] == ","):
                i += 1
            if s.startswith("/*", i):  # /*index=5*/
                k = s.find("*/", i)
                i = len(s) if k < 0 else k + 2
                continue
            if i >= len(s):
                return elems, i
            if s[i] == ")":
                return elems, i + 1
            elem, j = _parse_shape(s, i)
            if j == i:  # not a shape: skip a character rather than loop forever
                i += 1
                continue
            elems.append(elem)
            i = j
    m = _ARRAY_RE.match(s, i)
    if not m:
        return _Leaf(0, "", ""), i
    return _Leaf(_array_bytes(m.group(1), m.group(2)), m.group(1), m.group(2).strip()), m.end()


def _leaves(tree: Any) -> list[_Leaf]:
    if isinstance(tree, list):
        return [leaf for t in tree for leaf in _leaves(t)]
    return [tree]


def _tree_bytes(tree: Any) -> int:
    return sum(leaf.bytes for leaf in _leaves(tree))


def _is_context(tree: Any) -> bool:
    """A scalar u32[]/s32[]/token[] slot that async -start bundles carry after the output."""
    return isinstance(tree, _Leaf) and tree.dtype in ("u32", "s32", "token") and tree.dims == ""


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, e.g. ``f32[64,256]{1,0}`` -> 65536; tuples are summed."""
    tree, _ = _parse_shape(shape)
    return _tree_bytes(tree)
