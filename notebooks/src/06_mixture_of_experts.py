# %% [markdown]
# # 06 Mixture of Experts and expert parallelism
#
# A Mixture-of-Experts (MoE) layer replaces the dense MLP by `E` expert MLPs and a router that sends each
# token to its `top_k` best experts. Compute per token stays that of `k` experts while the parameters grow
# `E` times. This lesson follows the project's MoE code (`models/moe.py`, `parallel/expert.py`): routing,
# the capacity limit and the tokens it drops, the load-balancing losses, and the all-to-all that moves
# tokens to the devices holding their experts.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import picotron_jax as pj
from picotron_jax.memory.estimate import compile_train_step
from picotron_jax.models.moe import expert_capacity, expert_load, router_z_loss, switch_aux_loss
from picotron_jax.observe.hlo import collective_stats
from picotron_jax.tutorials import lessons

print(jax.device_count(), "devices")

# %% [markdown]
# ## Routing
#
# `models.moe.route` scores every token against the experts (fp32 softmax), picks the top `k`, and
# renormalises their weights. A router that prefers some experts (here a skew added to the logits) sends
# them more tokens than the others.

# %%
r = lessons.moe_routing_sample(seq_len=64, num_experts=8, top_k=2, batch=4)
load = np.asarray(expert_load(r.experts_BTK, 8))
print("experts of token 0:", np.asarray(r.experts_BTK[0, 0]), "weights", np.round(np.asarray(r.weights_BTK[0, 0]), 3))
print("token copies per expert:", load.astype(int).tolist(), "(mean", load.mean(), ")")
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.bar(range(8), load)
ax.axhline(load.mean(), color="black", ls="--", label="uniform")
ax.set_xlabel("expert")
ax.set_ylabel("token copies")
ax.legend()
plt.show()

# %% [markdown]
# ## Capacity and drops
#
# In `capacity` dispatch every expert takes at most `C = ceil(T * k / E * capacity_factor)` copies of each
# **sequence**; the extra copies with the lowest router score are dropped (their expert output is zero, the
# residual carries the token on). Static buffers `[E, batch, C, D]` keep the shapes fixed. The dropped share
# falls as the factor grows:

# %%
factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
dropped = [lessons.true_dropped_fraction(r, 8, f) for f in factors]
for f, d in zip(factors, dropped):
    print(f"capacity factor {f:4}: C = {expert_capacity(64, 2, 8, f):2d} slots, dropped {d:.1%}")
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.plot(factors, np.array(dropped) * 100, marker="o")
ax.set_xlabel("capacity factor")
ax.set_ylabel("dropped copies, %")
plt.show()

# %% [markdown]
# ## Load-balancing losses
#
# The Switch loss `E * sum_e f_e * P_e` (share of copies routed to `e` times its mean probability) is 1.0
# for a uniform router and grows with imbalance; the router z-loss `mean logsumexp(logits)^2` keeps the
# logits small. Both are added to the objective with `moe.aux_loss` and `moe.router_z_loss`.

# %%
N = 4 * 64
balanced = lessons.moe_routing_sample(skew=0.0)
for name, routing in (("no skew", balanced), ("skewed", r)):
    aux = switch_aux_loss(routing.probs_BTE.reshape(N, 8), routing.experts_BTK.reshape(N, 2))
    z = router_z_loss(routing.logits_BTE.reshape(N, 8))
    print(f"{name:8s} switch loss {float(aux):.3f}  z-loss {float(z):.3f}")
uniform = switch_aux_loss(jnp.full((N, 8), 1 / 8), jnp.tile(jnp.arange(8).reshape(4, 2), (N // 4, 1)))
print("exactly uniform routing: switch loss", float(uniform))

# %% [markdown]
# ## Expert parallelism: the all-to-all
#
# `moe-ep8` puts one expert on each of 8 devices. Inside `shard_map` one `all_to_all` over `expert`
# sends each device's buffer slice for expert `j` to rank `j`, and a second brings the outputs back (and
# the backward pass does the same twice). Compiling its train step shows the traffic. In training, the
log line reports the dropped share and the expert load (`| moe aux 1.012 drop 0.4% max/mean 1.31`; a
max / mean near `E / top_k` = 4 means the router collapsed onto two experts).

# %%
cfg = pj.load_config("moe-ep8", ["train.seq_len=32", "train.global_batch=8"])
compiled, *_ = compile_train_step(cfg, jax.devices())
stats = collective_stats(compiled.as_text())
print({k: f"{v / 2**10:.1f} KiB x{stats['counts'][k]}" for k, v in stats["bytes"].items() if v})
assert stats["bytes"]["all-to-all"] > 0

# %% [markdown]
# ## Exercise: predict the dropped fraction
#
# `load_BE[b, e]` counts the token copies sequence `b` sends to expert `e` (before any drop). Write
# `dropped_fraction(load_BE, T, k, factor)`: the share of all copies that capacity dispatch drops, for
# sequences of `T` tokens with `k` experts each. The capacity is per expert **and per sequence**, never more
# than `T`. The check compares with the layer's own dispatch at five capacity factors.

# %% answer
import math


def dropped_fraction(load_BE, T, k, factor):
    E = load_BE.shape[1]
    capacity = max(1, min(T, math.ceil(T * k / E * factor)))
    return np.maximum(load_BE - capacity, 0).sum() / load_BE.sum()
# %% blank
import math


def dropped_fraction(load_BE, T, k, factor):
    return ...

# %%
lessons.check_dropped_fraction(dropped_fraction)
