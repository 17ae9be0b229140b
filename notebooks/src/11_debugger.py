# %% [markdown]
# # 11 The debugger: breakpoints, replicas that disagree, a NaN traced to its op
#
# `picotron_jax/debug/` holds tools for the questions a failing run raises: *stop when something looks
# wrong and let me look* (conditional breakpoints), *are the copies that should be identical still
# identical?* (the replica check) and *which operation made the first NaN?* (`picotron-jax debug nan`).
# Each is a loop callback or a command and costs nothing unless switched on. The fault injector supplies
# the trouble.

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
from picotron_jax.debug.breakpoint import Breakpoint
from picotron_jax.debug.consistency import ReplicaCheck
from picotron_jax.debug.nan import replay_and_trace
from picotron_jax.faults import flip_one_ulp
from picotron_jax.tutorials import operations

print(jax.device_count(), "devices")
work = Path(tempfile.mkdtemp(prefix="picotron-lesson-11-"))
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=8", "optimizer.warmup_steps=2",
        "logging.progress=false", "monitor.tensorboard=false", "monitor.throughput_drop=0"]

# %% [markdown]
# ## A conditional breakpoint
#
# `debug.break_when="..."` (or a `Breakpoint` callback) is checked after every step on that step's metrics
# and their running `_median`, `_mean`, `_max`. The expression is parsed with `ast` against a whitelist and
# walked by the debugger's own evaluator, never `eval`. When it holds, an inspector gets the trainer, the
# state, the batch and the metrics: pdb on a terminal; here our own function, which records what it saw.
# Training after a breakpoint is identical to training without one.

# %%
seen = []
cfg = pj.load_config("single", [*TINY, "train.steps=6"])
brk = Breakpoint("step >= 3 and grad_norm > 0.9 * grad_norm_median", cfg,
                 inspector=lambda ctx: seen.append((ctx.step, ctx.metrics)))
with pj.Trainer(cfg, callbacks=[brk]) as trainer:
    trainer.run()
for step, metrics in seen:
    print(f"break after step {step}:", {k: round(v, 4) for k, v in metrics.items()})
try:
    Breakpoint("__import__('os').system('echo pwned') or loss > 1", cfg)
except pj.UserError as e:
    print("refused:", e)

# %% [markdown]
# ## Replicas that should agree
#
# Data-parallel copies of a parameter must stay bitwise equal; a bad memory cell, a non-deterministic kernel
# or a missing reduction breaks that silently. `debug.check_every=N` computes, **on device**, a fingerprint
# of every device's shard of every parameter and optimizer-state array (two 32-bit sums of the shard's bits,
# one weighted by position) and compares the copies that cover the same slice; only the fingerprints leave
# the devices. The fault injector moves one element of `layers.wq` by one ulp on data replica 1 after step 2.

# %%
cfg = pj.load_config("single", [*TINY, "mesh.num_devices=4", "mesh.data=4", "train.steps=3", "faults.flip_step=2",
                                "faults.flip_array=layers.wq", "faults.flip_replica=1"])
trainer = pj.Trainer(cfg, callbacks=[ReplicaCheck(every=1)])  # what the setting above with N = 1 adds
try:
    trainer.run()
except pj.RunAborted as e:
    message = str(e)
print(message)
# the flipped state was the step's replacement; make the same one-ulp flip on the state the run stopped with
params, what = flip_one_ulp(trainer.state.params, "layers.wq", 1, trainer.mesh)
desynced = trainer.state.replace(params=params)
print("the same fault again:", what, "->", ReplicaCheck(every=1).check(desynced, 2) == message.split(" (checked")[0])
wq = desynced.params["layers"]["wq"]
copies = [np.asarray(s.data) for s in wq.addressable_shards]
diff = [int(np.sum(c != copies[0])) for c in copies]
print("elements that differ from device 0's copy, per device:", diff)
trainer.close()

# %% [markdown]
# The fingerprints of each copy (the debugger's own): the odd one out is the flipped replica.

# %%
fps = np.array([operations.fingerprint_of(c) for c in copies], dtype=np.float64)
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.bar(np.arange(len(fps)) - 0.2, fps[:, 0] / 2**32, 0.4, label="sum of words / 2^32")
ax.bar(np.arange(len(fps)) + 0.2, fps[:, 1] / 2**32, 0.4, label="position-weighted sum / 2^32")
ax.set_xticks(np.arange(len(fps)), [f"device {s.device.id}" for s in wq.addressable_shards])
ax.set_title("fingerprints of the copies of layers.wq")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## A NaN traced to its operation
#
# A NaN injected into layer 1's forward output at step 3 stops the run (`monitor.on_nan=stop`). `picotron-jax
# debug nan RUN_DIR --step 3` (here `replay_and_trace`) restores the newest checkpoint before step 3, replays
# the step on its batch on one device, and evaluates its jaxpr operation by operation (the layer scan
# unrolled): the first operation that makes a NaN from finite inputs is named with its pass, layer, scope
# and source line.

# %%
nan_dir = work / "nan"
cfg = pj.load_config("single", [*TINY, "train.steps=4", "checkpoint.every=2", "checkpoint.async_save=false",
                                "faults.nan_step=3", "faults.nan_layer=1", "monitor.on_nan=stop"])
try:
    with pj.Trainer(cfg, nan_dir) as trainer:
        trainer.run()
except pj.RunAborted as e:
    print("stopped:", e)
origin = replay_and_trace(nan_dir, 3)
print(origin.describe())

# %% [markdown]
# ## Exercise: a replica fingerprint
#
# Write `fingerprint(shard)`: a few integers (at most 4) that summarise one device's shard, such that equal
# shards give equal fingerprints but a **one-ulp** change of any element shows, and so does **swapping**
# two elements. Hint: a float sum loses a one-ulp change among thousands of values; the bits do not
# (`shard.view(np.uint32)`), and weighting each word by its position catches swaps. Work modulo 2^32 (or
# 2^64) in integers. The check runs your fingerprint on real shards and on the desynchronised run above:
# it must name the same array and device as the debugger.

# %% answer
def fingerprint(shard):
    u = np.ascontiguousarray(shard, np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    weights = np.arange(u.size, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(1)
    return [int(u.sum() % 2**32), int((u * weights).sum() % 2**32)]
# %% blank
def fingerprint(shard):
    return ...

# %%
operations.check_fingerprint(fingerprint, copies[0], desynced, message)
