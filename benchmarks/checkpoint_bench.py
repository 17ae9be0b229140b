"""Checkpoint figures for bench-32m: how long a save blocks the training loop (async vs sync), how long
the write takes, the step time of a loop that saves after every step, and bytes on disk at several zstd
levels versus the raw bytes of the train state.

Variants run interleaved in one process (the host is noisy); every figure is a median over --repeats.
The state is the one after a few real train steps, so Adam's moments are not the zeros of step 0.

    PYTHONPATH=. python benchmarks/checkpoint_bench.py --out /tmp/ckpt-bench --json checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import jax

from picotron_jax.checkpoint.manager import Checkpointer
from picotron_jax.checkpoint.metadata import raw_bytes
from picotron_jax.config import load_config
from picotron_jax.run import build_run

ROOT = Path(__file__).resolve().parents[1]


def timed_save(state, cfg, folder: Path) -> tuple[float, float, int]:
    """(seconds the caller was blocked, seconds until the checkpoint was complete, bytes on disk)."""
    shutil.rmtree(folder, ignore_errors=True)
    ckpt = Checkpointer(folder, cfg, say=lambda _m: None)
    t0 = time.perf_counter()
    blocked = ckpt.save(state, {"mesh": "bench-32m"})
    ckpt.close()  # waits for the background write
    complete = time.perf_counter() - t0
    size = ckpt.store.bytes_on_disk(int(state.step))
    shutil.rmtree(folder, ignore_errors=True)
    return blocked, complete, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/picotron-ckpt-bench", help="scratch folder for the checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--loop-steps", type=int, default=3, help="steps per loop measurement (a save after each)")
    parser.add_argument("--levels", default="0,1,3,9,19", help="zstd levels to compare (0 = uncompressed)")
    parser.add_argument("--json", dest="json_out", help="also write the result here")
    args = parser.parse_args()

    cfg = load_config(ROOT / "meshes" / "bench-32m.yaml", ["checkpoint.every=1", "checkpoint.codec=zstd"])
    run = build_run(cfg)
    from picotron_jax.train.state import init_train_state

    state = init_train_state(cfg, run.setup)
    for i in range(args.train_steps):
        state, _ = run.train_step(state, run.batch(i))
    jax.block_until_ready(state)
    out = Path(args.out)
    timed_save(state, cfg, out / "warmup")  # starts Orbax's threads, first TensorStore contexts

    modes: dict[str, dict[str, list]] = {m: {"blocked_s": [], "complete_s": []} for m in ("async", "sync")}
    for r in range(args.repeats):
        for mode in ("async", "sync"):  # interleaved
            cfg.checkpoint.async_save = mode == "async"
            cfg.checkpoint.compression_level = 3
            blocked, complete, _ = timed_save(state, cfg, out / f"{mode}-{r}")
            modes[mode]["blocked_s"].append(blocked)
            modes[mode]["complete_s"].append(complete)

    # the loop itself: --loop-steps steps, each followed by a save (none / async / sync), interleaved
    loop: dict[str, list] = {m: [] for m in ("none", "async", "sync")}
    cfg.checkpoint.compression_level = 3
    for r in range(args.repeats):
        for mode in loop:
            cfg.checkpoint.async_save = mode == "async"
            folder = out / f"loop-{mode}-{r}"
            shutil.rmtree(folder, ignore_errors=True)
            ckpt = Checkpointer(folder, cfg, say=lambda _m: None) if mode != "none" else None
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for i in range(args.loop_steps):
                state, metrics = run.train_step(state, run.batch(args.train_steps + i))
                if ckpt is not None:
                    ckpt.save(state, {"mesh": "bench-32m"})
            jax.block_until_ready(metrics)
            loop[mode].append((time.perf_counter() - t0) / args.loop_steps)
            if ckpt is not None:
                ckpt.close()
            shutil.rmtree(folder, ignore_errors=True)

    levels = [int(x) for x in args.levels.split(",")]
    sizes: dict[int, dict[str, list]] = {lv: {"bytes": [], "complete_s": []} for lv in levels}
    cfg.checkpoint.async_save = False
    for r in range(args.repeats):
        for level in levels:
            cfg.checkpoint.compression_level = level
            _, complete, size = timed_save(state, cfg, out / f"zstd{level}-{r}")
            sizes[level]["bytes"].append(size)
            sizes[level]["complete_s"].append(complete)

    raw = raw_bytes(state)
    result = {
        "config": "meshes/bench-32m.yaml", "params": run.setup.spec.num_params(), "raw_bytes": raw,
        "device": f"{len(run.devices)} x {run.devices[0].platform}", "repeats": args.repeats,
        "save": {m: {k: round(statistics.median(v), 4) for k, v in d.items()} for m, d in modes.items()},
        "loop_step_s": {m: round(statistics.median(v), 4) for m, v in loop.items()},
        "compression": {str(lv): {"bytes_on_disk": int(statistics.median(d["bytes"])),
                                  "ratio": round(statistics.median(d["bytes"]) / raw, 4),
                                  "complete_s": round(statistics.median(d["complete_s"]), 4)}
                        for lv, d in sizes.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
