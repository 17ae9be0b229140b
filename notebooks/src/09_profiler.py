# %% [markdown]
# # 09 The profiler: where does a step's time go?
#
# `picotron-jax profile` (and `profile.start_step` / `profile.steps` in a training run) traces a window of
# steps with `jax.profiler`, joins every XLA op of the trace to the compiled program (collective kinds,
# bytes, mesh axes, the model's modules) and splits each device's time into categories; rules then
# rank bottlenecks with a suggested setting. Here the fault injector makes device 5 start each step
# 0.3 s late: a straggler that the other seven wait for in their collectives.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import picotron_jax as pj
from picotron_jax.profile.command import run_profile
from picotron_jax.tutorials import lessons

print(jax.device_count(), "devices")

# %% [markdown]
# ## Profile three steps of a run with a late device
#
# `run_profile` trains up to the end of the window (steps 3 to 5 here), analyses the trace and writes
# `profile.json` and `profile.md` next to the trace (which XProf, TensorBoard or Perfetto open).

# %%
out = Path(tempfile.mkdtemp(prefix="picotron-lesson-09-"))
cfg = pj.load_config("dp8", ["train.seq_len=32", "faults.sleep_step=1", "faults.sleep_steps=0", "faults.sleep_s=0.3",
                             "faults.sleep_phase=device", "faults.device=5"])
report = run_profile(cfg, out, steps=3, start=3)

# %% [markdown]
# ## The time split
#
# Every instant of every device's window goes to one category; they add up to the step. A large share is
# `collective_wait`: seven devices sit in their all-reduce until device 5 arrives. (On a loaded machine,
# where the 8 virtual devices also wait for CPU cores, the straggler rule may not fire; the per-device rows
# below still show who arrives last.)

# %%
breakdown = {k: v for k, v in sorted(report["breakdown"].items(), key=lambda kv: -kv[1]) if v > 0}
print(f"step {report['step_s'] * 1e3:.0f} ms; categories add up to {sum(breakdown.values()) * 1e3:.0f} ms")
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.barh(list(breakdown), [v * 1e3 for v in breakdown.values()])
ax.invert_yaxis()
ax.set_xlabel("ms per step (mean over devices)")
plt.show()

# %% [markdown]
# Per device: the late device computes like the others but hardly waits; the others wait for it.

# %%
rows = report["devices"]
fig, ax = plt.subplots(figsize=(6, 2.8))
ids = [r["device"] for r in rows]
ax.bar(np.arange(len(rows)) - 0.2, [r["compute_s"] * 1e3 for r in rows], 0.4, label="compute")
ax.bar(np.arange(len(rows)) + 0.2, [r["wait_s"] * 1e3 for r in rows], 0.4, label="waiting in collectives")
ax.set_xticks(np.arange(len(rows)), ids)
ax.set_xlabel("device")
ax.set_ylabel("ms per step")
ax.legend()
plt.show()

# %% [markdown]
# ## Findings
#
# Each finding has its evidence, a suggested setting and an estimated gain (as if each device were its own
# chip, and on this machine, where virtual devices share a few cores).

# %%
for i, f in enumerate(report["findings"], 1):
    print(f"{i}. {f['kind']}: {f['evidence']}")
    print(f"   -> {', '.join(f['suggestion']) or '(no setting)'} (est. {f['estimated_gain']:.0%} of the step)")
print((out / "profile.md").read_text()[:600])

# %% [markdown]
# ## Exercise: find the straggler yourself
#
# Write `straggler(rows)`: given the per-device rows of `profile.json` (`device`, `compute_s`,
# `collective_s`, `wait_s`, ...), return the `device` id of the straggler. Think about who waits in a
# collective: everyone except the last to arrive. The check compares with the device the fault injector
# made late, also with the rows in another order.

# %% answer
def straggler(rows):
    return min(rows, key=lambda r: r["wait_s"])["device"]
# %% blank
def straggler(rows):
    return ...

# %%
lessons.check_straggler(straggler, report["devices"], late_device=5)
