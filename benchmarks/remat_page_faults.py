"""Wall time, user/system CPU and minor page faults of each bench-32m train step, for one remat policy.

Usage: XLA_FLAGS= .venv/bin/python benchmarks/remat_page_faults.py none|full [STEPS]
       (prefix GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for transparent huge pages in malloc's mmapped blocks)
"""

from __future__ import annotations

import resource
import sys
import time

import jax

from picotron_jax.config import load_config
from picotron_jax.run import build_run
from picotron_jax.train.state import init_train_state


def main() -> None:
    remat, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cfg = load_config("meshes/bench-32m.yaml", [f"memory.remat={remat}"])
    run = build_run(cfg)
    state = init_train_state(cfg, run.setup)
    step = run.train_step.lower(state, run.batch(0)).compile()
    temp = step.memory_analysis().temp_size_in_bytes
    for i in range(steps):
        batch = run.batch(i)
        jax.block_until_ready(batch)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(f"remat={remat} step {i}: wall {time.perf_counter() - t0:.2f} s, user {r1.ru_utime - r0.ru_utime:.2f} s, "
              f"system {r1.ru_stime - r0.ru_stime:.2f} s, minor faults {r1.ru_minflt - r0.ru_minflt}, "
              f"temporaries {temp / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
