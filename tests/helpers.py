"""Shared test helpers: build a run from a preset without data files, synthetic batches."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.config import Config, load_config
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.run import build_run
from picotron_jax.train.state import StateSetup, init_train_state
from picotron_jax.train.step import build_grad_fn, build_train_step

ROOT = Path(__file__).resolve().parents[1]
MESHES = ROOT / "meshes"
# small enough to compile quickly, same model family as the presets
FAST = ["train.seq_len=32", "train.steps=3", "optimizer.warmup_steps=1"]


def preset(name: str, *overrides: str) -> Config:
    return load_config(MESHES / f"{name}.yaml", [*FAST, *overrides])


def setup(cfg: Config) -> tuple[MeshRules, StateSetup]:
    run = build_run(cfg, data=False)
    return run.rules, run.setup


def synthetic_batch(cfg: Config, step: int, rules: MeshRules | None = None) -> dict[str, jax.Array]:
    rng = np.random.default_rng(1000 + step)
    B, T = cfg.train.global_batch, cfg.train.seq_len
    toks = rng.integers(0, 16, (B, T + 1))  # 16 of the vocab: a quickly learnable distribution
    mask = np.ones((B, T), np.float32)
    mask[0, : T // 4] = 0.0  # some padding, so the masked mean is exercised
    batch = {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32), "mask": mask}
    if rules is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, rules.batch_sharding()) for k, v in batch.items()}


def run_steps(cfg: Config, steps: int = 3):
    """Loss of each of `steps` optimizer steps and the gradients of step 1 (host numpy)."""
    rules, st = setup(cfg)
    state = init_train_state(cfg, st)
    metrics0, grads = build_grad_fn(cfg, rules, st)(state.params, synthetic_batch(cfg, 0, rules))
    grads = jax.tree.map(np.asarray, grads)
    step = build_train_step(cfg, rules, st)
    losses = []
    for i in range(steps):
        state, metrics = step(state, synthetic_batch(cfg, i, rules))
        losses.append(float(metrics["loss"]))
    assert np.isclose(losses[0], float(metrics0["loss"]), rtol=1e-6)
    return np.array(losses), grads


class Quiet:
    """A duck-typed loop callback (no base class, no events): importable as 'helpers:Quiet' in configs."""


def primitive_dtypes(closed_jaxpr, primitive: str, operand: int | None = None) -> dict[str, int]:
    """How many `primitive` equations the jaxpr holds (nested jaxprs included, a scan body once), by the
    dtype of their output (or of operand `operand`): the program's own dtypes, not the policy's."""
    from collections import Counter

    from picotron_jax.memory.flops import sub_jaxprs

    counts: Counter = Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive:
                var = eqn.outvars[0] if operand is None else eqn.invars[operand]
                counts[str(var.aval.dtype)] += 1
            for value in eqn.params.values():
                for sub in sub_jaxprs(value):
                    walk(sub)

    walk(closed_jaxpr.jaxpr)
    return dict(counts)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server():
    """A local S3-compatible server (moto) on 127.0.0.1 for the s3:// tests: a generator for a fixture, yields
    its URL once it answers (up to 20 s), stops it afterwards."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
