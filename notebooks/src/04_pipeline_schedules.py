# %% [markdown]
# # 04 Pipeline schedules
#
# Pipeline parallelism cuts the layers into `p` stages on `p` ranks; a batch is cut into `m` microbatches
# that flow through them. While the pipe fills and drains, ranks wait: the **bubble**. The schedule decides
# the order of forwards (F) and backwards (B) on each rank. picotron_jax simulates a schedule once into
# integer tables (`parallel/pipeline_schedule.py`) that the jitted step then executes slot by slot; this
# lesson draws those tables, counts their bubble against the formula, and measures what 1F1B saves over
# AFAB in activation memory.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

import picotron_jax as pj
from picotron_jax.memory.estimate import estimate_memory
from picotron_jax.parallel.pipeline_schedule import build_schedule, render
from picotron_jax.tutorials import lessons

print(jax.device_count(), "devices")

# %% [markdown]
# ## The schedule tables
#
# `build_schedule(kind, p, m, v)` runs every rank's program (warm-up forwards, one-forward-one-backward,
# cool-down) slot by slot, a rank running its next op as soon as its input has arrived. `render` prints
# the result as `picotron-jax pipeline-schedule` does.

# %%
print(render(build_schedule("1f1b", 4, 8)))

# %% [markdown]
# Drawn: one row per rank, one column per slot; forwards in colour by microbatch, backwards the same colour
# hatched, idle slots white. AFAB runs every forward first, 1F1B alternates after a short warm-up, and the
# interleaved schedule gives each rank `v` chunks of layers.

# %%
def draw(schedule, ax):
    cmap = plt.get_cmap("tab10")
    for t in range(schedule.num_slots):
        for r in range(schedule.p):
            for work, hatch in ((schedule.forward[t][r], None), (schedule.backward[t][r], "///")):
                if work is not None:
                    chunk, mb = work
                    ax.add_patch(Rectangle((t, schedule.p - 1 - r), 1, 1, facecolor=cmap(mb % 10),
                                           alpha=1.0 if chunk == 0 else 0.55, hatch=hatch, edgecolor="black", lw=0.4))
    ax.set_xlim(0, schedule.num_slots)
    ax.set_ylim(0, schedule.p)
    ax.set_yticks(np.arange(schedule.p) + 0.5, [f"rank {r}" for r in reversed(range(schedule.p))])
    ax.set_title(f"{schedule.kind}: p={schedule.p}, m={schedule.m}, v={schedule.v}, "
                 f"bubble {schedule.bubble_fraction():.3f}")


fig, axes = plt.subplots(3, 1, figsize=(10, 6.5))
for ax, (kind, p, m, v) in zip(axes, [("afab", 4, 8, 1), ("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2)]):
    draw(build_schedule(kind, p, m, v), ax)
axes[-1].set_xlabel("slot (one forward or one backward)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Bubble: counted vs formula
#
# Counting idle rank-slots in the table gives exactly the analytic bubble `(p-1)/(v·m + p-1)`: more
# microbatches, or more chunks per rank, shrink it.

# %%
ms = np.arange(1, 33)
fig, ax = plt.subplots(figsize=(6, 3.2))
for kind, v in (("1f1b", 1), ("interleaved", 2)):
    valid = [m for m in ms if kind != "interleaved" or m % 4 == 0]
    counted = [build_schedule(kind, 4, m, v).bubble_fraction() for m in valid]
    analytic = [(4 - 1) / (v * m + 4 - 1) for m in valid]
    assert np.allclose(counted, analytic)
    ax.plot(valid, counted, "o", label=f"{kind} (v={v}) counted")
    ax.plot(valid, analytic, "-", label=f"{kind} (v={v}) (p-1)/(v m + p-1)")
ax.set_xlabel("microbatches m (p = 4)")
ax.set_ylabel("bubble fraction")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Activation memory: AFAB vs 1F1B
#
# Same bubble, different memory: AFAB keeps every microbatch's activations until the turn, 1F1B at most
# `p - r` per rank. The compiled step's memory analysis (compile only, nothing runs) shows it.

# %%
peaks = {}
for kind in ("afab", "1f1b"):
    cfg = pj.load_config("pp4-1f1b", [f"pipeline.schedule={kind}", "pipeline.microbatches=8",
                                      "train.global_batch=16", "train.seq_len=64"])
    e = estimate_memory(cfg, jax.devices())
    s = build_schedule(kind, 4, 8)
    peaks[kind] = e.temp_bytes
    print(f"{kind:5s} temporaries {e.temp_bytes / 2**20:6.2f} MiB per device, at most {max(s.max_in_flight())} "
          f"microbatches in flight")
assert peaks["1f1b"] < peaks["afab"]
fig, ax = plt.subplots(figsize=(4, 2.5))
ax.bar(list(peaks), [v / 2**20 for v in peaks.values()], color=["tab:red", "tab:green"])
ax.set_ylabel("temporaries, MiB per device")
plt.show()

# %% [markdown]
# ## Exercise: microbatches for a target bubble
#
# Write `microbatches_for(kind, p, target, v)`: the fewest microbatches `m` whose bubble is at most
# `target` (for `afab` and `1f1b`, `v` is ignored: one chunk per rank; the interleaved schedule needs `m`
# to be a multiple of `p`). The check builds the schedule tables for your `m` and for one step fewer.
#
# Careful with floating point: `3 * 0.8 / 0.2` is `12.000000000000002`.

# %% answer
import math


def microbatches_for(kind, p, target, v):
    v = v if kind == "interleaved" else 1
    m = math.ceil((p - 1) * (1 - target) / (target * v) - 1e-9)  # (p-1) / (v m + p-1) <= target
    step = p if kind == "interleaved" else 1
    return max(step, math.ceil(m / step) * step)
# %% blank
import math


def microbatches_for(kind, p, target, v):
    return ...

# %%
lessons.check_microbatches(microbatches_for)
