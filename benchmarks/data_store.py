"""Reading a token store that answers slowly: step time with and without the prefetcher, cold first step.

The store is a local one with `--latency` seconds injected into every shard read (TokenStore's
`latency_s`, standing for object storage far away). The "step" is `--step` seconds of sleep standing
for the device step (so the figure does not depend on how loaded the CPU is); batches are read the
way the trainer reads them: `prefetch(..., size=2)` on a background thread (batch i+1 is read and
placed while step i runs). The memory cache holds `--memory-shards` shards, far below the store,
so every step needs fresh shards from the store.

    PYTHONPATH=. python benchmarks/data_store.py [--latency 0.2] [--step 0.1] [--steps 80]

Prints one JSON object: median step time (s) over the steps after the first `--warmup`, for the
local store without latency, the slow store with the prefetcher, and the slow store without it
(`data.prefetch_steps=0`), and the time to the first batch with a cold cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from picotron_jax.data.loader import prefetch  # noqa: E402
from picotron_jax.data.prepare import prepare_store  # noqa: E402
from picotron_jax.data.store import TokenStore  # noqa: E402
from picotron_jax.data.store_dataset import StoreDataset  # noqa: E402


def run(store_dir: str, latency: float, prefetch_steps: int, args) -> dict:
    st = TokenStore(store_dir, latency_s=latency)
    ds = StoreDataset(st, args.seq_len, 0, memory_bytes=args.memory_shards * st.shard_nbytes(0),
                      prefetch_steps=prefetch_steps)
    times, t_first = [], None
    t0 = time.perf_counter()
    batches = prefetch((ds.batch_rows(i, args.batch, slice(None)) for i in range(args.steps)), size=2)
    last = t0
    for i, _batch in enumerate(batches):
        now = time.perf_counter()
        if i == 0:
            t_first = now - t0
        time.sleep(args.step)  # the device step
        now = time.perf_counter()
        times.append(now - last)
        last = now
    ds.close()
    steady = times[args.warmup:]
    return {"median_step_s": round(statistics.median(steady), 4), "mean_step_s": round(statistics.mean(steady), 4),
            "first_batch_s": round(t_first, 3), "fetches": ds.cache.stats["fetches"],
            "wait_s": round(ds.cache.stats["wait_s"], 2), "prefetch_depth": ds.cache.depth}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.2, help="seconds per shard read of the slow store")
    p.add_argument("--step", type=float, default=0.1, help="seconds per simulated device step")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--shards", type=int, default=400)
    p.add_argument("--shard-tokens", type=int, default=1024)
    p.add_argument("--memory-shards", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz \n"), args.shards * args.shard_tokens - 1))
        (Path(tmp) / "c.txt").write_text(text)
        store = str(Path(tmp) / "store")
        prepare_store(str(Path(tmp) / "c.txt"), store, shard_tokens=args.shard_tokens, say=lambda _m: None)
        out = {"config": vars(args),
               "local": run(store, 0.0, 8, args),
               "slow_prefetch": run(store, args.latency, 8, args),
               "slow_no_prefetch": run(store, args.latency, 0, args)}
    out["prefetch_vs_local"] = round(out["slow_prefetch"]["median_step_s"] / out["local"]["median_step_s"], 3)
    out["no_prefetch_vs_local"] = round(out["slow_no_prefetch"]["median_step_s"] / out["local"]["median_step_s"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
