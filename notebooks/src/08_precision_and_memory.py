# %% [markdown]
# # 08 Precision and memory
#
# Lower-precision compute (bf16, fp16) halves activation bytes and, on GPUs and TPUs, multiplies matmul
# speed; fp16's narrow range needs **loss scaling**. Rematerialisation trades FLOPs for memory by
# recomputing activations in the backward pass. This lesson looks at the precision policies, watches
# dynamic loss scaling skip an overflowing step, compares remat policies with the compile-only memory
# estimate, and lets the planner pick the fastest configuration that fits a budget.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import matplotlib.pyplot as plt
import numpy as np

import picotron_jax as pj
from picotron_jax.memory.planner import candidate_space, choose, format_plan, plan
from picotron_jax.train.precision import resolve_policy
from picotron_jax.train.state import init_train_state
from picotron_jax.tutorials import lessons

print(jax.device_count(), "devices")
SMALL = ["train.seq_len=32", "train.global_batch=8"]

# %% [markdown]
# ## Policies
#
# `precision.mode` picks parameter / compute / output dtypes; parameters and the optimizer state stay
# fp32 master weights in every mode. `auto` picks per backend (fp32 on XLA:CPU, which has no fast
# bf16/fp16 matmuls). `precision.overrides` pins modules by name pattern.

# %%
for mode in ("auto", "fp32", "bf16", "fp16"):
    policy = resolve_policy(pj.load_config("single", [f"precision.mode={mode}"]), jax.devices()[:1])
    print(f"{mode:5s} -> {policy.describe()}")
mixed = resolve_policy(pj.load_config("single", ["precision.mode=bf16", "precision.overrides=head:fp32"]),
                       jax.devices()[:1])
print("bf16 with head:fp32 ->", mixed.describe())

# %% [markdown]
# ## Dynamic loss scaling in fp16
#
# The loss is multiplied by `S` before the backward pass and the gradients divided by `S` in fp32, so
# small gradients survive fp16. A step whose gradients are not finite is skipped (parameters and Adam
# state unchanged) and `S` halves; after `precision.loss_scale_growth_interval` finite steps `S` doubles.
# Here one token of the third batch gets weight 10^6: its scaled gradient overflows fp16.

# %%
cfg = pj.load_config("single", SMALL + ["precision.mode=fp16", "precision.promote_after=0",
                                        "precision.loss_scale_growth_interval=2"])
run = pj.build_run(cfg)
state = init_train_state(cfg, run.setup)
scales, skipped, losses = [], [], []
for i in range(7):
    batch = run.batch(i)
    if i == 2:
        batch = {**batch, "mask": batch["mask"].at[1, 5].set(1e6)}
    state, metrics = run.step(state, batch, i + 1)
    scales.append(float(state.loss_scale.scale))
    skipped.append(int(state.loss_scale.skipped))
    losses.append(float(metrics["loss"]))
print("loss scale   ", scales)
print("skipped steps", skipped)
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.step(range(1, 8), np.log2(scales), where="post")
ax.axvline(3, color="red", ls=":", label="overflow (step 3)")
ax.set_xlabel("step")
ax.set_ylabel("log2 loss scale")
ax.legend()
plt.show()

# %% [markdown]
# ## Remat policies and the planner
#
# `memory.remat` decides what the scanned layers keep for the backward pass. The planner compiles each
# candidate against abstract inputs (nothing is allocated), reads `memory_analysis()` and the matmul FLOPs
# counted from the jaxpr (recomputation included), and picks the fastest whose peak fits the budget.

# %%
base = pj.load_config("single", SMALL + ["train.seq_len=128"])
space = candidate_space(base, 1, remats=["none", "dots", "full"], accums=[1], zeros=[0])
table = plan(base, jax.devices()[:1], space)
by_remat = {c.remat: c for c in table}
budget = (by_remat["none"].peak + by_remat["full"].peak) // 2  # between the extremes
choice = choose(table, budget)
print(format_plan(table, budget, choice))
fig, ax1 = plt.subplots(figsize=(5, 2.8))
names = ["none", "dots", "full"]
ax1.bar(names, [by_remat[n].estimate.temp_bytes / 2**20 for n in names], color="tab:blue")
ax1.set_ylabel("temporaries, MiB")
ax2 = ax1.twinx()
ax2.plot(names, [by_remat[n].estimate.flops / by_remat["none"].estimate.flops for n in names], "ko-")
ax2.set_ylabel("matmul FLOPs vs none")
plt.show()

# %% [markdown]
# ## Exercise: the loss-scale update
#
# Write `update(scale, good_steps, finite, interval)` returning the new `(scale, good_steps)`: on an
# overflowing step halve the scale (never below 1) and reset the counter; on a finite step count it, and
# when the counter reaches `interval`, double the scale and reset the counter. The check replays a run of
# finite and overflowing steps through the trainer's own update and yours.

# %% answer
def update(scale, good_steps, finite, interval):
    if not finite:
        return max(scale / 2, 1.0), 0
    good_steps += 1
    if good_steps >= interval:
        return scale * 2, 0
    return scale, good_steps
# %% blank
def update(scale, good_steps, finite, interval):
    return ...

# %%
lessons.check_loss_scale(update)
