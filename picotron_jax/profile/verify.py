"""`--verify`: run a finding's suggestion next to the profiled config and measure the gain.

Both configs are built in one process and their steps timed in alternation (A, B, A, B, ...: the
machine's load changes both alike; this CPU is shared), each round a few steps on batches read
beforehand, so the figure is the step's device time without the data loader. The measured gain,
1 - t_B / t_A per token, is compared with the finding's `estimated_gain_here`; it agrees when
|measured - estimated| <= max(0.10, 0.5 x estimated) (shares of the step).
"""

from __future__ import annotations

import statistics
import time

import jax

from picotron_jax.config import Config


def _quiet(cfg: Config) -> Config:
    return cfg.replace(logging={"progress": False}, eval={"tokens": 0, "fraction": 0.0, "every": 0},
                       generate={"prompt": ""}, checkpoint={"every": 0}, profile={"start_step": 0})


def _timed_steps(trainer, steps: int) -> float:
    built = trainer.built
    batches = [built.batch(trainer.step_count + i) for i in range(steps)]
    jax.block_until_ready((trainer.state, batches))
    t0 = time.perf_counter()
    out = None
    for b in batches:
        trainer.state, out = built.step(trainer.state, b, trainer.step_count + 1)
        trainer.step_count += 1
    jax.block_until_ready((trainer.state, out))
    return (time.perf_counter() - t0) / steps


def tolerance(estimate: float) -> float:
    return max(0.10, 0.5 * abs(estimate))


def verify(cfg: Config, finding: dict, rounds: int = 4, steps: int = 3, log=print) -> dict:
    from rich.console import Console
    import io

    from picotron_jax.trainer import Trainer

    base, new = _quiet(cfg), _quiet(cfg.with_overrides(finding["suggestion"]))
    total = 2 + rounds * steps
    base, new = (c.replace(train={"steps": max(c.train.steps, total + 2)}) for c in (base, new))
    quiet = Console(file=io.StringIO())
    a, b = Trainer(base, console=quiet), Trainer(new, console=quiet)
    try:
        for t in (a, b):  # compile and warm up
            _timed_steps(t, 2)
        ta, tb = [], []
        for r in range(rounds):
            ta.append(_timed_steps(a, steps))
            tb.append(_timed_steps(b, steps))
            log(f"verify round {r + 1}/{rounds}: {ta[-1] * 1e3:.1f} ms -> {tb[-1] * 1e3:.1f} ms per step")
    finally:
        a.close()
        b.close()
    step_a, step_b = statistics.median(ta), statistics.median(tb)
    tokens_a = base.train.global_batch * base.train.seq_len
    tokens_b = new.train.global_batch * new.train.seq_len
    measured = 1.0 - (step_b / tokens_b) / (step_a / tokens_a)
    est = finding["estimated_gain_here"]
    return {"kind": finding["kind"], "suggestion": finding["suggestion"], "step_s_before": step_a,
            "step_s_after": step_b, "rounds": rounds, "steps_per_round": steps, "measured_gain": measured,
            "estimated_gain": finding["estimated_gain"], "estimated_gain_here": est,
            "tolerance": tolerance(est), "within_tolerance": abs(measured - est) <= tolerance(est)}
