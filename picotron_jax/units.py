"""Sizes written by people: '16GiB', '512MiB', '1.5GB', '4096' (bytes). Used by config checks and commands."""

from __future__ import annotations

import re

from picotron_jax.errors import UserError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "--budget") -> int:
    """'16GiB' -> 17179869184; '1.5GB' -> 1500000000; '4096' -> 4096; `what` names the flag or field in errors."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise UserError(f"{what} {text!r}: expected a size like 16GiB, 512MiB, 1.5GB or a number of bytes")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])
