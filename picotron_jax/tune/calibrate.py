"""Calibrating the step-time model on a few measured layouts (`tune layout --calibrate K`).

The micro-benchmarks (cost.measure_hardware) price each term of the model in isolation: a matmul, a
large elementwise op, a loop of tiny thunks, an all-reduce. Inside a train step the rates differ (dots
of other shapes, fusions that read several operands, 8 device programs contending for 2 cores), and
by a different factor per term. So the tuner first measures K layouts chosen to differ most in their
predicted terms (farthest-point selection on the normalised terms), fits one non-negative factor per
term by least squares,

    measured_step_s[j] ~= sum_k  c_k * term_k[j]        (c >= 0, scipy.optimize.nnls)

and re-ranks every candidate with the calibrated rates (rate_k / c_k). A term the measured layouts
do not need gets c_k = 0 and drops out; with fewer layouts than terms a weak prior pulls the factors
towards one common factor (see `fit_scales`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from picotron_jax.tune.cost import Hardware

# predict_step's terms, and the Hardware rate each one divides by (None: multiplies, latency/thunk)
TERMS: tuple[tuple[str, str], ...] = (("compute_s", "flops_per_s"), ("comm_s", "copy_bytes_per_s"),
                                      ("latency_s", "latency_s"), ("write_s", "write_bytes_per_s"),
                                      ("dispatch_s", "thunk_s"))


def term_matrix(predicted: list[dict[str, float]]) -> np.ndarray:
    """[candidates, terms] of the uncalibrated model's terms (seconds)."""
    return np.array([[p.get(k, 0.0) for k, _ in TERMS] for p in predicted], float)


def spread_picks(predicted: list[dict[str, float]], k: int) -> list[int]:
    """Indices of `k` candidates that differ most in their terms: the best predicted first, then each
    time the candidate farthest (in terms scaled by their spread) from those already picked."""
    X = term_matrix(predicted)
    if len(X) == 0 or k <= 0:
        return []
    scale = X.std(axis=0)
    Z = X / np.where(scale > 0, scale, 1.0)
    picks = [int(np.argmin(X.sum(axis=1)))]
    while len(picks) < min(k, len(X)):
        d = np.min(((Z[:, None, :] - Z[None, picks, :]) ** 2).sum(-1), axis=1)
        d[picks] = -1.0
        picks.append(int(np.argmax(d)))
    return picks


def fit_scales(predicted: list[dict[str, float]], measured: list[float], prior: float = 0.01) -> np.ndarray:
    """Non-negative factor per term so that sum_k c_k term_k fits the measured step times. With fewer
    layouts than terms the fit is underdetermined, so it is pulled (weight `prior`) towards one common
    factor: the measured total over the model's total. Rows appended to the least squares:
    sqrt(prior) * mean_k * (c_k - base) for each term k."""
    from scipy.optimize import nnls

    X, y = term_matrix(predicted), np.asarray(measured, float)
    total = float(X.sum())
    base = float(y.sum()) / total if total > 0 else 1.0
    mean = X.mean(axis=0)
    A = np.vstack([X, np.sqrt(prior) * np.diag(mean)])
    b = np.concatenate([y, np.sqrt(prior) * mean * base])
    c, _ = nnls(A, b)
    return c


def calibrated(hw: Hardware, scales: np.ndarray) -> Hardware:
    """`hw` with each term's rate divided by its factor (a zero factor switches the term off)."""
    changes = {}
    for (_, field), c in zip(TERMS, scales):
        rate = getattr(hw, field)
        if field in ("latency_s", "thunk_s"):
            changes[field] = rate * float(c)
        else:
            changes[field] = rate / float(c) if c > 0 else float("inf")
    if hw.copy_bytes_per_s <= 0:  # per-axis links price the traffic: scale them instead
        c = float(scales[1])
        changes["copy_bytes_per_s"] = 0.0
        changes["bandwidth"] = {a: (b / c if c > 0 else float("inf")) for a, b in hw.bandwidth.items()}
    return replace(hw, **changes, source=f"{hw.source}, calibrated on measured layouts "
                                         f"(factors {', '.join(f'{k[0]}={c:.3g}' for k, c in zip(TERMS, scales))})")
