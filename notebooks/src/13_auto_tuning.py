# %% [markdown]
# # 13 Auto-tuning: searching layouts without running them
#
# `picotron-jax tune layout` lists every way to lay a model out on N devices (mesh axis sizes x ZeRO stage x
# remat x microbatches x pipeline schedule), drops what config validation refuses, **compiles** each
# survivor's train step for abstract inputs (never runs it) for its exact per-device peak memory, its FLOPs
# and the bytes of every collective per mesh axis, and ranks them with an analytic step time. With `--target`
# (a cluster description) nothing is measured: the ranking is a prediction for hardware that is not here.
# This lesson runs that compile-only search in the notebook for a tiny model on 8 virtual devices, as if they
# were one node of 8 H100s.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import math

import jax
import matplotlib.pyplot as plt

import picotron_jax as pj
from picotron_jax.tune.cost import load_target
from picotron_jax.tune.layout import choose, format_report, search
from picotron_jax.tune.space import count_factorisations, enumerate_layouts, factorisations
from picotron_jax.tutorials import scale

print(jax.device_count(), "devices")
cfg = pj.load_config("single", ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                                "model.num_heads=4", "model.num_kv_heads=2", "train.seq_len=16",
                                "train.global_batch=8", "logging.progress=false"])

# %% [markdown]
# ## The search space
#
# 8 = 2^3 devices over the 5 mesh axes: every ordered factorisation. Here we search `data` and `tensor` only,
# ZeRO 0 or 3, no remat, one microbatch; validation refuses layouts the model cannot take (4 heads do not
# split 8 ways).

# %%
print("8 devices over 5 axes:", len(factorisations(8, 5)), "factorisations, e.g.", factorisations(8, 5)[:4])
layouts, refused = enumerate_layouts(cfg, 8, axes=("data", "tensor"), remats=("none",), zeros=(0, 3),
                                     accums=(1,))
print(len(layouts), "candidates,", refused, "refused by validation:")
for layout in layouts:
    print("  ", layout.label())

# %% [markdown]
# ## Compile, measure nothing, rank
#
# `search` compiles every candidate (compile-only, like `picotron-jax memory`) and predicts
# `step_s = FLOPs / rate + sum over collectives (latency + bytes / bandwidth of the slowest axis spanned)`
# from the target's figures. `top=0`: no trial runs.

# %%
hw = load_target("meshes/targets/8xh100.yaml")
results = search(cfg, jax.devices(), layouts, hw, top=0, cache_dir=None)
print(format_report(results, choose(results), math.inf))

# %%
labels = [r.layout.label().replace(" remat=none m1", "") for r in results]
fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8), sharey=True)
a.barh(labels, [r.compiled["peak_bytes"] / 2**20 for r in results])
a.set_xlabel("compiled peak per device (MiB)")
b.barh(labels, [r.predicted["step_s"] * 1e6 for r in results])
b.set_xlabel("predicted step on 8 x H100 (us)")
a.invert_yaxis()
plt.show()

# %% [markdown]
# ## A memory budget
#
# With a budget one byte under the smallest peak, every candidate is out, reported with its compiled bytes;
# with the smallest peak itself, only the layouts that reach it stay in. The compile results are the same:
# only the filter changes (the CLI caches them, so a second search with another budget compiles nothing).

# %%
smallest = min(r.compiled["peak_bytes"] for r in results)
for budget in (smallest - 1, smallest):
    fits = [r.layout.label() for r in results if r.compiled["peak_bytes"] <= budget]
    print(f"budget {budget:,} bytes: {len(fits)} fit {fits}")

# %% [markdown]
# ## Exercise: how many layouts?
#
# Write `layouts_of(n, k)`: the number of ways to give k ordered mesh axes sizes >= 1 whose product is n.
# Brute force is fine for small n, but there is a closed form: for each prime p^a of n, the a factors of p
# go into k axes (stars and bars). The check compares with the tuner's own enumeration.

# %% answer
def layouts_of(n, k):
    total, p = 1, 2
    while n > 1:
        a = 0
        while n % p == 0:
            n, a = n // p, a + 1
        total *= math.comb(a + k - 1, k - 1)
        p += 1
    return total
# %% blank
def layouts_of(n, k):
    return ...

# %%
assert layouts_of(8, 5) == count_factorisations(8, 5)
scale.check_layout_count(layouts_of)
