# %% [markdown]
# # 10 Monitoring: detectors, faults and alerts
#
# A long run fails in a few typical ways: a NaN from one bad batch or one flaky machine, a loss spike, a
# slow device, memory or disk running out. The `monitor` section (on by default) watches every step with
# detectors that each have an action (`log`, `alert`, `skip`, `rewind`, `stop`), and writes every anomaly
# to `RUN_DIR/alerts.jsonl`. To rehearse them before they happen for real, the `faults` section injects
# each kind of trouble at a chosen step. This lesson injects a NaN and a loss spike into a tiny model and
# watches the monitor catch both at their step.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import math
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import picotron_jax as pj
from picotron_jax.observe.monitor import RobustWindow
from picotron_jax.tutorials import operations

print(jax.device_count(), "devices")
work = Path(tempfile.mkdtemp(prefix="picotron-lesson-10-"))
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=8", "optimizer.warmup_steps=2",
        "logging.progress=false", "logging.every=1", "monitor.tensorboard=false",
        "monitor.throughput_drop=0"]  # tiny steps on a shared machine: timing noise, not a real slowdown


def alerts(run_dir):
    path = Path(run_dir) / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

# %% [markdown]
# ## A NaN in one layer's gradient, rewound
#
# `faults.nan_step=5 faults.nan_layer=1 faults.nan_site=gradient` puts a NaN into the gradient reaching
# decoder layer 1 at step 5, inside the jitted step; `faults.transient=true` makes it a one-off (a flaky
# machine: replaying the step does not reproduce it). The `nan` detector fires, names the deepest layer whose
# gradient is non-finite (where the NaN entered the backward pass), and its default action `rewind`
# restores the newest checkpoint (step 4) and continues with the batch after the bad one.

# %%
nan_dir = work / "nan"
cfg = pj.load_config("single", [*TINY, "train.steps=8", "checkpoint.every=2", "checkpoint.async_save=false",
                                "faults.nan_step=5", "faults.nan_layer=1", "faults.nan_site=gradient",
                                "faults.transient=true"])
with pj.Trainer(cfg, nan_dir) as trainer:
    summary = trainer.run()
    train_rows = [r for r in trainer.history if r["kind"] == "train"]
(row,) = alerts(nan_dir)
print(json.dumps(row, indent=1))
steps = [r["step"] for r in train_rows]
print("steps trained:", steps, "-> finished", summary.steps, "steps, error:", summary.error)
assert (row["step"], row["kind"], row["where"], row["action"]) == (5, "nan", "layer 1", "rewind")

# %% [markdown]
# The loss curve over the order in which steps ran: step 5 appears twice, first non-finite (not drawn),
# then, after the rewind, finite.

# %%
fig, ax = plt.subplots(figsize=(6, 2.8))
losses = np.array([r["loss"] for r in train_rows])
ax.plot(range(len(losses)), np.where(np.isfinite(losses), losses, np.nan), "o-")
bad = int(np.flatnonzero(~np.isfinite(np.array([r["grad_norm"] for r in train_rows])))[0])
ax.axvline(bad, color="r", ls="--", label="NaN at step 5: rewind to 4")
ax.set_xticks(range(len(steps)), steps)
ax.set_xlabel("step (in the order run)")
ax.set_ylabel("loss")
ax.legend()
plt.show()

# %% [markdown]
# ## A loss spike, alerted
#
# `faults.spike_step=13` replaces step 13's batch by uniform noise: its loss jumps to about ln(256) = 5.5
# nats while the model sits near 4.8. The `loss_spike` detector keeps the last `monitor.window` losses and
# flags a loss above **median + spike_mads x 1.4826 x MAD** and above **(1 + spike_min_rel) x median**
# (a robust z-score: the median and the median absolute deviation are not dragged by earlier spikes, and
# 1.4826 x MAD is the standard deviation of normal noise). The first `monitor.warmup` steps are not judged.
# Its default action is `alert`: a banner, a row in alerts.jsonl and (with `monitor.webhook_url`) a JSON POST.

# %%
spike = dict(window=8, warmup=4, mads=4.0, min_rel=0.1)
spike_dir = work / "spike"
cfg = pj.load_config("single", [*TINY, "train.steps=14", "faults.spike_step=13", f"monitor.window={spike['window']}",
                                f"monitor.warmup={spike['warmup']}", f"monitor.spike_mads={spike['mads']}",
                                f"monitor.spike_min_rel={spike['min_rel']}"])
with pj.Trainer(cfg, spike_dir) as trainer:
    trainer.run()
    run_losses = [r["loss"] for r in trainer.history if r["kind"] == "train"]
(row,) = alerts(spike_dir)
print(row["kind"], "at step", row["step"], "|", row["detail"], "|", row["threshold"])

# %%
window = RobustWindow(spike["window"], spike["mads"], spike["min_rel"])
limits = []
for step, loss in enumerate(run_losses, 1):
    limits.append(window.limit())
    if not (step > spike["warmup"] and loss > limits[-1]):
        window.values.append(loss)
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(range(1, len(run_losses) + 1), run_losses, "o-", label="loss")
ax.step(range(1, len(run_losses) + 1), limits, where="mid", label="spike threshold")
ax.axvspan(0.5, spike["warmup"] + 0.5, color="0.9", label="warm-up: not judged")
ax.set_xlabel("step")
ax.set_ylim(min(run_losses) - 0.2, max(run_losses) + 0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise: the spike threshold
#
# Write `spike_limit(values, mads, min_rel)`: given the last losses of the window, return the value above
# which the next loss counts as a spike: the larger of median + `mads` x 1.4826 x MAD and
# (1 + `min_rel`) x median, and `math.inf` while the window holds fewer than 8 values. The check compares
# with the monitor on several windows, then replays your rule over this run's losses: it must flag exactly
# the step the monitor alerted on.

# %% answer
def spike_limit(values, mads, min_rel):
    if len(values) < 8:
        return math.inf
    v = np.asarray(values)
    med = np.median(v)
    mad = np.median(np.abs(v - med))
    return max(med + mads * 1.4826 * mad, (1 + min_rel) * med)
# %% blank
def spike_limit(values, mads, min_rel):
    return ...

# %%
operations.check_spike_limit(spike_limit, run_losses, alert_step=row["step"], **spike)
