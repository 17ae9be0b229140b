# %% [markdown]
# # 03 Tensor parallelism
#
# Megatron-LM splits each layer's matmuls over `tensor` ranks so that one layer needs only one all-reduce
# in the forward pass per block: the first projection is **column-parallel** (its output units are split:
# q/k/v by head, gate/up by MLP unit), the second **row-parallel** (its input is split: the attention
# output projection `wo`, the MLP's `w_down`), so each rank multiplies its own slice and one `psum` adds the
# partial results. The vocabulary is split too: the embedding and the LM head, with a cross-entropy that
# never builds the full `[batch, seq, vocab]` logits on one device.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import picotron_jax as pj
from picotron_jax.memory.estimate import compile_train_step
from picotron_jax.observe.hlo import collective_stats
from picotron_jax.observe.shardings import sharding_table
from picotron_jax.parallel.vocab import vocab_parallel_cross_entropy
from picotron_jax.tutorials import layouts

print(jax.device_count(), "devices")

# %% [markdown]
# ## Column and row splits in the real layout
#
# On `tp2-dp4` the logical-axis rules give the split. Column-parallel weights are split on their output
# (`heads`, `mlp`), row-parallel ones on their input; norms are replicated.

# %%
cfg = pj.load_config("tp2-dp4", ["train.seq_len=32", "train.global_batch=8"])
run = pj.build_run(cfg, data=False)
abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        run.setup.abstract.params, run.setup.shardings.params)
for row in sharding_table(abstract):
    kind = {"wq": "column", "wk": "column", "wv": "column", "w_gate": "column", "w_up": "column",
            "wo": "row", "w_down": "row", "embed": "vocab", "lm_head": "vocab"}.get(row.path.split(".")[-1], "-")
    print(f"{row.path:18s} {str(row.shape):18s} {row.spec:34s} {kind}")

# %% [markdown]
# ## The row-parallel projection, by hand
#
# `layouts.reference_row_parallel` is the per-device body: each rank holds `x[:, F/t slice]` and
# `w[F/t slice, :]`, multiplies them and `psum`s over `tensor`. It runs inside `jax.shard_map` on a
# `data=2 x tensor=4` mesh and equals the one-device product.

# %%
mesh = layouts._tp_mesh(2, 4)
x = jax.device_put(np.random.default_rng(0).normal(size=(8, 32)).astype(np.float32),
                   NamedSharding(mesh, P("data", "tensor")))
w = jax.device_put(np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32),
                   NamedSharding(mesh, P("tensor", None)))
y = jax.jit(lambda a, b: layouts.row_parallel(layouts.reference_row_parallel, mesh, a, b))(x, w)
print("max |y - x @ w| =", float(np.max(np.abs(np.asarray(y) - np.asarray(x) @ np.asarray(w)))))
layouts.check_row_parallel(layouts.reference_row_parallel)

# %% [markdown]
# ## Vocabulary-parallel cross-entropy
#
# Each tensor rank scores only its `V/t` slice of the vocabulary; the log-sum-exp over the whole
# vocabulary is combined with `pmax` and `psum`, and the target's logit comes from the rank that owns it.
# The result equals the plain cross-entropy on the full logits.

# %%
rules = run.rules
rng = np.random.default_rng(2)
h_BTD = jnp.asarray(rng.normal(size=(8, 32, 128)), jnp.float32)
head_DV = jnp.asarray(rng.normal(size=(128, 256)) * 0.05, jnp.float32)
targets_BT = jnp.asarray(rng.integers(0, 256, size=(8, 32)), jnp.int32)
mask_BT = jnp.ones((8, 32), jnp.float32)
nll, _ = jax.jit(lambda *a: vocab_parallel_cross_entropy(rules, *a, vocab_first=False))(
    h_BTD, jax.device_put(head_DV, NamedSharding(rules.mesh, P(None, "tensor"))), targets_BT, mask_BT)
plain = optax.softmax_cross_entropy_with_integer_labels(h_BTD @ head_DV, targets_BT).sum()
print(f"vocab-parallel {float(nll):.4f}  plain {float(plain):.4f}")
assert abs(float(nll) - float(plain)) < 1e-2

# %% [markdown]
# ## Collective bytes of the whole train step
#
# Compiling the train step (nothing runs) for `tensor = 2` and `4` shows the traffic per device and step
# from the HLO. The all-reduces grow with the activations of the tensor-parallel blocks (per layer: two in
# the forward pass, two in the backward, each `[B/data, T, D]`) plus the gradients' all-reduce over `data`.

# %%
traffic = {}
for name in ("tp2-dp4", "tp4-dp2"):
    c = pj.load_config(name, ["train.seq_len=32", "train.global_batch=8"])
    compiled, *_ = compile_train_step(c, jax.devices())
    stats = collective_stats(compiled.as_text())
    traffic[name] = {k: v for k, v in stats["bytes"].items() if v}
    print(name, {k: f"{v / 2**10:.1f} KiB x{stats['counts'][k]}" for k, v in traffic[name].items()})
kinds = sorted({k for t in traffic.values() for k in t})
fig, ax = plt.subplots(figsize=(6, 3))
for i, name in enumerate(traffic):
    ax.bar(np.arange(len(kinds)) + 0.4 * i, [traffic[name].get(k, 0) / 2**10 for k in kinds], 0.4, label=name)
ax.set_xticks(np.arange(len(kinds)) + 0.2, kinds)
ax.set_ylabel("KiB per device per step")
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise: the bytes of one all-reduce
#
# The HLO counts an all-reduce at the size of the tensor it reduces (what nccl-tests calls the data size;
# a ring moves about twice that over the wire). For the row-parallel projection above with a global batch
# `batch` split over `data` ranks, output width `d` and `itemsize`-byte elements, how many bytes does the
# compiled program's all-reduce count per device? The check compiles the projection for three shapes and
# meshes and compares with `observe.hlo.collective_bytes`.

# %% answer
def allreduce_bytes(batch, d, data, tensor, itemsize):
    return batch // data * d * itemsize
# %% blank
def allreduce_bytes(batch, d, data, tensor, itemsize):
    return ...

# %%
layouts.check_allreduce_bytes(allreduce_bytes)
