# %% [markdown]
# # 01 Mesh and shardings
#
# Every layout in picotron_jax is a way of laying arrays out over one named device mesh with five axes,
# `pipe, data, context, expert, tensor` (outermost to innermost). Model code never names a mesh axis:
# parameters carry *logical* axis names (`embed`, `heads`, `mlp`, `vocab`, ...) and one table maps them to
# mesh axes. This lesson builds the mesh, places arrays on it, reads the table, and ends with an exercise:
# predict what one device holds of a parameter under a layout.
#
# On a machine without accelerators, 8 virtual CPU devices stand in for 8 GPUs; the flag must be set
# before JAX starts.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import matplotlib.pyplot as plt
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import picotron_jax as pj
from picotron_jax.mesh import build_mesh, describe
from picotron_jax.observe.shardings import sharding_table
from picotron_jax.parallel.sharding import LOGICAL_RULES, ZERO_RULES, logical_to_spec, sharding_for
from picotron_jax.tutorials import layouts

print(jax.device_count(), "devices")

# %% [markdown]
# ## The 5-axis mesh
#
# `tp2-dp4` asks for `data=4, tensor=2`; the other three axes exist with size 1, so partition specs never
# change shape. `tensor` is innermost: neighbouring devices (on a GPU node, the fastest links) form a
# tensor group.

# %%
cfg = pj.load_config("tp2-dp4")
mesh = build_mesh(cfg.mesh)
print(describe(mesh))
print(mesh.devices.reshape(4, 2))  # rows: data rank, columns: tensor rank

# %% [markdown]
# ## Placing an array
#
# A `NamedSharding(mesh, P(...))` names, for each dimension of an array, the mesh axes it is split over.
# `P("data", "tensor")` splits rows 4 ways and columns 2 ways; `P("data")` splits rows only and copies
# each row block to both tensor ranks.

# %%
x = jax.device_put(np.arange(16 * 8, dtype=np.float32).reshape(16, 8), NamedSharding(mesh, P("data", "tensor")))
jax.debug.visualize_array_sharding(x)
y = jax.device_put(x, NamedSharding(mesh, P("data")))
jax.debug.visualize_array_sharding(y)
print("x shard", x.sharding.shard_shape(x.shape), "| y shard", y.sharding.shard_shape(y.shape))

# %% [markdown]
# ## Logical axis rules
#
# The table in `picotron_jax/parallel/sharding.py` (`LOGICAL_RULES`; ZeRO-3 uses `ZERO_RULES`, which
# adds `embed -> data`):

# %%
for name, axes in LOGICAL_RULES.items():
    print(f"{name:10s} -> {axes}   (ZeRO-3: {ZERO_RULES[name]})")

# %% [markdown]
# `logical_to_spec` turns a parameter's logical axes into a partition spec on a mesh. Two rules keep it
# total: an axis of size 1 is dropped, and a dimension that does not divide by its mesh axes stays whole
# (4 KV heads on `tensor=8`). The run's shardings come from `sharding_for`, which puts such KV heads on
# a mesh that views `tensor` as 4 KV groups x 2 copies, so each rank holds the one KV head its query
# head uses (as Megatron does).

# %%
wq_axes = ("layers", "embed", "heads", "head_dim")
print("wq on tp2-dp4:       ", logical_to_spec(wq_axes, mesh, LOGICAL_RULES, (4, 128, 8, 16)))
print("wq on tp2-dp4 ZeRO-3:", logical_to_spec(wq_axes, mesh, ZERO_RULES, (4, 128, 8, 16)))
tp8 = build_mesh(pj.load_config("tp8").mesh)
print("wk (4 KV heads) on tp8:", logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), tp8, LOGICAL_RULES,
                                                 (4, 128, 4, 16)))
wk_sharding = sharding_for(tp8, ("layers", "embed", "kv_heads", "head_dim"), (4, 128, 4, 16), LOGICAL_RULES)
print("the run's wk on tp8:   ", wk_sharding.spec, dict(wk_sharding.mesh.shape), "per rank", wk_sharding.shard_shape((4, 128, 4, 16)))

# %% [markdown]
# ## Every parameter of a run
#
# `pj.build_run(cfg, data=False)` validates the config and builds mesh, rules and the state's shardings
# without creating any array. The table shows each parameter's global shape, its spec and what one device
# holds (`Trainer.shardings()` prints the same for a live run).

# %%
run = pj.build_run(cfg, data=False)
abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        run.setup.abstract.params, run.setup.shardings.params)
table = sharding_table(abstract)
table

# %% [markdown]
# ## Who holds what
#
# The LM head `[D, V]` is vocabulary-parallel: tensor rank t holds vocabulary columns `t*V/2 ... (t+1)*V/2 - 1`,
# and all four data ranks hold a copy. Each cell below is coloured by the tensor rank that stores it.

# %%
head_sharding = run.setup.shardings.params["lm_head"]
owner = np.zeros((128, 256))
for device, index in head_sharding.devices_indices_map((128, 256)).items():
    tensor_rank = int(np.argwhere(mesh.devices == device)[0][-1])
    owner[index] = tensor_rank
fig, ax = plt.subplots(figsize=(6, 2.5))
ax.imshow(owner, aspect="auto", cmap="coolwarm")
ax.set_xlabel("vocabulary (V)")
ax.set_ylabel("width (D)")
ax.set_title("lm_head: tensor rank holding each element")
plt.show()

# %% [markdown]
# ## Exercise: predict the per-device shapes
#
# Same model (`vocab 256, width 128, MLP 352, 4 layers, 8 query heads of 16`), layout `tp2-dp4` **with
# ZeRO-3** (`train.zero_stage=3`: parameters are additionally split over `data` on their `embed` axis).
# Write the shape one device holds of `layers.wq` `[L, D, H, K]`, `layers.w_down` `[L, F, D]`, `embed`
# `[V, D]` and `lm_head` `[D, V]`. The check builds the real layout and compares.

# %% answer
answer = {
    "layers.wq": (4, 32, 4, 16),
    "layers.w_down": (4, 176, 32),
    "embed": (128, 32),
    "lm_head": (32, 128),
}
# %% blank
answer = {
    "layers.wq": (...),      # [L, D, H, K]
    "layers.w_down": (...),  # [L, F, D]
    "embed": (...),          # [V, D]
    "lm_head": (...),        # [D, V]
}

# %%
layouts.check_device_shapes(answer, preset="tp2-dp4", overrides=("train.zero_stage=3",))
