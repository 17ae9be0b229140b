# %% [markdown]
# # 02 Data parallelism and ZeRO
#
# Data parallelism (DP) gives every device a slice of the batch and a full copy of the model; the
# gradients are summed over `data` before the update. ZeRO removes the copies: stage 1 splits the Adam
# moments over `data`, stage 3 (FSDP) the parameters too, gathering each layer's weights when it runs.
# In picotron_jax all three are the same program with different shardings (`train.zero_stage`), and XLA's
# SPMD partitioner places the collectives. This lesson measures per-device memory with the compiled
# memory analysis, reads the collectives in the HLO, and checks that every layout trains like one device.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import matplotlib.pyplot as plt
import numpy as np

import picotron_jax as pj
from picotron_jax.memory.estimate import estimate_from_compiled
from picotron_jax.observe.hlo import collective_stats
from picotron_jax.train.state import init_train_state
from picotron_jax.tutorials import layouts

print(jax.device_count(), "devices")

# %% [markdown]
# ## One compiled step per layout
#
# Each preset is the same model; `single` is the one-device reference. For each layout we build the run,
# compile its train step once, and use the compiled program three ways: its memory analysis, its HLO
# text, and four training steps.

# %%
SMALL = ["train.seq_len=32", "train.global_batch=8"]
LAYOUTS = {"single": [], "dp8": [], "zero1-dp8": [], "zero3-dp8": []}
results = {}
for name, extra in LAYOUTS.items():
    cfg = pj.load_config(name, SMALL + extra)
    run = pj.build_run(cfg)
    state = init_train_state(cfg, run.setup)
    compiled = run.train_step.lower(state, run.batch(0)).compile()
    memory = estimate_from_compiled(cfg, compiled, run.rules, run.setup)
    collectives = collective_stats(compiled.as_text())
    losses = []
    for i in range(4):
        state, metrics = compiled(state, run.batch(i))
        losses.append(float(metrics["loss"]))
    results[name] = dict(memory=memory, collectives=collectives, losses=losses)
    print(f"{name:10s} params {memory.params_bytes / 2**10:8.1f} KiB  optimizer {memory.opt_state_bytes / 2**10:8.1f} KiB"
          f"  temporaries {memory.temp_bytes / 2**10:8.1f} KiB  losses {np.round(losses, 5)}")

# %% [markdown]
# ## Memory per device
#
# Parameters: full on every device for DP and ZeRO-1, divided by 8 under ZeRO-3. Adam moments (twice the
# parameters): divided by 8 under ZeRO-1 and ZeRO-3. These are the state's exact bytes; the temporaries are
# XLA:CPU's (gradients, activations, scratch).

# %%
names = list(results)
parts = {"parameters": [results[n]["memory"].params_bytes for n in names],
         "optimizer state": [results[n]["memory"].opt_state_bytes for n in names],
         "temporaries": [results[n]["memory"].temp_bytes for n in names]}
fig, ax = plt.subplots(figsize=(7, 3))
bottom = np.zeros(len(names))
for label, values in parts.items():
    ax.bar(names, np.array(values) / 2**20, bottom=bottom, label=label)
    bottom += np.array(values) / 2**20
ax.set_ylabel("MiB per device")
ax.set_title("compiled memory per device")
ax.legend()
plt.show()

# %% [markdown]
# ## The collectives in the HLO
#
# Bytes each device moves per step, read from the optimized HLO (`observe/hlo.py`; all-reduce counted at
# the tensor's size, reduce-scatter at its input's). DP all-reduces the gradients (the parameters' size).
# ZeRO reduce-scatters them instead (`parallel/zero.py`): each rank receives only the summed slice its
# moments update, then ZeRO-1 all-gathers the updated slices back. ZeRO-3 gathers the weights when a layer
# runs, in the forward and again in the backward pass, so its all-gather is up to twice the parameters.
# One device moves nothing.

# %%
for name in names:
    moved = {k: v for k, v in results[name]["collectives"]["bytes"].items() if v}
    print(f"{name:10s}", {k: f"{v / 2**10:.1f} KiB" for k, v in moved.items()} or "no collectives")

# %% [markdown]
# ## Same losses as one device
#
# The layouts split work, not the mathematics: the losses agree with the one-device run to float32
# rounding (the order of the gradient sums differs).

# %%
reference = np.array(results["single"]["losses"])
for name in names[1:]:
    diff = np.max(np.abs(np.array(results[name]["losses"]) - reference))
    print(f"{name:10s} max |loss - single| = {diff:.2e}")
    assert diff < 1e-4
fig, ax = plt.subplots(figsize=(5, 3))
for name in names:
    ax.plot(range(1, 5), results[name]["losses"], marker="o", label=name, alpha=0.7)
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise: bytes per device under ZeRO
#
# Write `state_bytes(param_bytes, data, zero_stage)` returning `(parameter bytes, Adam-moment bytes)` that
# one device holds, for `param_bytes` bytes of fp32 parameters split over `data` ranks (every parameter of
# this model divides by 8 on its `embed` axis). Adam keeps two moments per parameter; its step counter is
# a few bytes and may be ignored. The check compares with the real shardings of `dp` runs with ZeRO-0, 1
# and 3 on 8 and 4 data ranks.

# %% answer
def state_bytes(param_bytes, data, zero_stage):
    params = param_bytes // data if zero_stage >= 3 else param_bytes
    moments = 2 * param_bytes // data if zero_stage >= 1 else 2 * param_bytes
    return params, moments
# %% blank
def state_bytes(param_bytes, data, zero_stage):
    params = ...   # parameter bytes on one device
    moments = ...  # Adam first and second moments on one device
    return params, moments

# %%
layouts.check_state_bytes(state_bytes)
