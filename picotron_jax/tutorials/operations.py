"""Graders of lessons 10-11: the monitor's spike threshold (against observe/monitor.RobustWindow and the
run's own alert), and a replica fingerprint (against one-ulp flips, swapped elements and the fault
injector's desynchronised replica, as debug/consistency.py compares them)."""

from __future__ import annotations

import math

import jax
import numpy as np

from picotron_jax.tutorials.grading import Checker, Passed

# ------------------------------------------------------------------------------ 10 monitoring


def _windows(seed: int = 0) -> list[tuple[str, list[float]]]:
    """Windows where the rules differ: a noisy plateau, a falling loss, a flat one, skewed noise, too few."""
    rng = np.random.default_rng(seed)
    return [("a noisy plateau", list(2.0 + 0.05 * rng.standard_normal(20))),
            ("a falling loss", list(np.linspace(5.0, 3.0, 16) + 0.01 * rng.standard_normal(16))),
            ("a flat loss", [4.0] * 12),
            ("skewed noise with outliers", list(3.0 + rng.exponential(0.2, 24) + (np.arange(24) % 11 == 0) * 2.0)),
            ("only 5 values", list(3.0 + 0.1 * rng.standard_normal(5)))]


def check_spike_limit(fn, losses: list[float], alert_step: int, window: int, warmup: int, mads: float,
                      min_rel: float) -> Passed:
    """fn(values, mads, min_rel) -> the value above which the next loss is a spike; checked against the
    monitor's RobustWindow on hand-made windows, then replayed over the run's losses, where it must flag
    exactly the step the monitor alerted on."""
    from collections import deque

    from picotron_jax.observe.monitor import RobustWindow

    c = Checker("10_monitoring")
    for what, values in _windows():
        ref = RobustWindow(size=len(values), mads=mads, min_rel=min_rel)
        ref.values.extend(values)
        want = ref.limit() if len(values) >= 8 else math.inf
        got = float(c.call("fn runs", fn, list(values), mads, min_rel))
        ok = got == want if math.isinf(want) else math.isclose(got, want, rel_tol=1e-6)
        c.expect(ok, f"threshold on {what} equals the monitor's", f"you have {got:.6g}, the monitor has {want:.6g}"
                 + (" (fewer than 8 values: nothing is judged yet)" if math.isinf(want) else ""))
    seen: deque = deque(maxlen=window)
    flagged = []
    for step, loss in enumerate(losses, 1):
        limit = float(fn(list(seen), mads, min_rel)) if len(seen) >= min(8, window) else math.inf
        if step > warmup and loss > limit:
            flagged.append(step)
        else:
            seen.append(loss)
    c.expect(flagged == [alert_step], "replayed over the run's losses it flags exactly the monitor's alert",
             f"your rule flags steps {flagged}, the monitor alerted at step {alert_step}")
    return c.result


# ------------------------------------------------------------------------------ 11 debugger


def _words(fp) -> tuple[int, ...]:
    a = np.asarray(fp).reshape(-1)
    return tuple(int(x) for x in a)


def _ulp_flip(x: np.ndarray, i: int) -> np.ndarray:
    y = x.copy().reshape(-1)
    y[i] = np.nextafter(y[i], np.float32(np.inf), dtype=np.float32)
    return y.reshape(x.shape)


def check_fingerprint(fn, shard: np.ndarray, flipped_state, reference_message: str) -> Passed:
    """fn(shard) -> a few integers summarising one device's shard (what leaves the device). Checked: equal
    shards give equal fingerprints, a one-ulp change anywhere changes it, so does swapping two elements, it is
    at most 4 numbers, and on the fault injector's desynchronised state it names the replica the debugger
    named."""
    from picotron_jax.debug.consistency import first_divergence, named_arrays

    c = Checker("11_debugger")
    x = np.asarray(shard, np.float32)
    fp = c.call("fn runs", fn, x)
    c.expect(len(_words(fp)) <= 4, "only a fingerprint leaves the device (at most 4 numbers)",
             f"yours has {len(_words(fp))} numbers for a shard of {x.size}")
    c.expect(_words(c.call("fn runs", fn, x.copy())) == _words(fp), "equal shards give equal fingerprints",
             "two calls on the same values differ")
    positions = [0, x.size // 3, x.size // 2 + 1, x.size - 1]
    for i in positions:
        c.expect(_words(fn(_ulp_flip(x, i))) != _words(fp), f"a one-ulp change of element {i} shows",
                 f"the fingerprint is {_words(fp)} before and after moving element {i} by one ulp")
    flat = x.reshape(-1)
    j = next(k for k in range(1, flat.size) if flat[k] != flat[0])
    swapped = flat.copy()
    swapped[0], swapped[j] = flat[j], flat[0]
    c.expect(_words(fn(swapped.reshape(x.shape))) != _words(fp), "swapping two elements shows",
             f"elements 0 and {j} swapped give the same fingerprint {_words(fp)}")
    rows = []
    for name, arr in named_arrays(flipped_state).items():
        for s in arr.addressable_shards:
            rows.append({"array": name, "index": [(a.start, a.stop) for a in s.index], "device": s.device.id,
                         "process": s.device.process_index, "fp": list(_words(fn(np.asarray(s.data))))})
    got = first_divergence(rows)
    c.expect(got is not None and got.split(" from ")[0] == reference_message.split(" from ")[0],
             "on the desynchronised run it names the debugger's array and device",
             f"yours: {got!r}; the debugger: {reference_message!r}")
    return c.result


def fingerprint_of(x) -> np.ndarray:
    """The debugger's own fingerprint of one shard (debug/consistency._fingerprints), for comparison."""
    from picotron_jax.debug.consistency import _fingerprints

    return np.asarray(_fingerprints([jax.numpy.asarray(x)]))[0]
