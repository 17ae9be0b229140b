# %% [markdown]
# # 05 Context parallelism: ring attention
#
# Long sequences do not fit one device's attention: the scores are `T x T`. `mesh.context = c` splits the
# sequence over `c` devices. Each keeps its queries while the key/value blocks travel around a ring
# (`ppermute`, one device per step); each visiting block's attention is merged into the running output
# with flash attention's online softmax. Causal attention makes the work uneven (the last block attends to
# the whole past), which the **zigzag** layout repairs. This lesson runs the project's ring attention
# against plain attention, counts the work per device, and measures memory against sequence length.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from picotron_jax.config import MeshConfig
from picotron_jax.mesh import build_mesh
from picotron_jax.models.attention import causal_attention
from picotron_jax.parallel.context import ring_attention, ring_attention_work
from picotron_jax.parallel.sharding import MeshRules, sequence_order, zigzag_order
from picotron_jax.tutorials import lessons

print(jax.device_count(), "devices")


def context_rules(c, zigzag=True):
    return MeshRules(build_mesh(MeshConfig(context=c), jax.devices()[:c]), context_zigzag=zigzag)

# %% [markdown]
# ## The ring, step by step
#
# At ring step `s`, device `i` holds the K/V block that started on device `(i - s) mod c`; after `c - 1`
# steps every device has seen every block.

# %%
c = 4
print("step | K/V block held by device 0..3")
for s in range(c):
    print(f"  {s}  |", [(i - s) % c for i in range(c)])

# %% [markdown]
# ## Ring attention equals plain attention
#
# The ring works in the layout `sequence_order(T, c, zigzag)`: the token columns are permuted before the
# step (and the rotary positions with them). Permute q, k, v, run the ring on 4 devices, undo the
# permutation, and compare with one device's causal attention (8 query heads sharing 4 KV heads).

# %%
rng = np.random.default_rng(0)
B, T, H, G, K = 2, 64, 8, 4, 16
q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
k = jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32)
v = jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32)
reference = causal_attention(q, k, v)
for zigzag in (False, True):
    order = sequence_order(T, c, zigzag)
    rules = context_rules(c, zigzag)
    out = jax.jit(lambda a, b, d: ring_attention(rules, a, b, d, zigzag=zigzag))(q[:, order], k[:, order], v[:, order])
    back = jnp.zeros_like(out).at[:, order].set(out)
    err = float(jnp.max(jnp.abs(back - reference)))
    print(f"zigzag={zigzag}: max |ring - plain| = {err:.2e}")
    assert err < 1e-4

# %% [markdown]
# ## Work per device: contiguous vs zigzag
#
# `ring_attention_work` counts the query x key pairs each rank scores in the forward ring. With contiguous
# blocks, rank `c-1` scores `c` times as many as rank 0 and the others wait for it; zigzag (rank `i` holds
# chunks `i` and `2c-1-i` of `2c`) makes them equal.

# %%
T_long = 1024
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
for ax, c_ in zip(axes, (2, 4, 8)):
    zero_q = jnp.zeros((1, T_long, 1, 2))
    for zigzag, colour in ((False, "tab:red"), (True, "tab:green")):
        work = np.asarray(ring_attention_work(context_rules(c_, zigzag), zero_q, zero_q[..., :1, :], zero_q[..., :1, :],
                                              zigzag=zigzag))
        ax.bar(np.arange(c_) + (0.4 if zigzag else 0), work, 0.4, color=colour,
               label="zigzag" if zigzag else "contiguous")
        print(f"c={c_} zigzag={zigzag}: pairs per rank {work.tolist()}")
    ax.set_title(f"context = {c_}")
    ax.set_xlabel("rank")
axes[0].set_ylabel("query x key pairs")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Memory against sequence length
#
# The compiled forward + backward of attention alone, one device against the ring on 8: plain attention's
# temporaries grow with `T^2`, the ring's with `(T/c)^2` per block (and it never stores a full score matrix
# for the backward pass: its custom VJP runs the ring again).

# %%
def attention_temp_bytes(T, c):
    shape_q, shape_kv = (1, T, 8, 16), (1, T, 4, 16)
    if c == 1:
        fn = causal_attention
    else:
        rules = context_rules(c)
        fn = lambda a, b, d: ring_attention(rules, a, b, d)  # noqa: E731
    loss = lambda a, b, d: jnp.sum(fn(a, b, d))  # noqa: E731
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in (shape_q, shape_kv, shape_kv)]
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis().temp_size_in_bytes


lengths = [512, 1024, 2048]
memory = {c_: [attention_temp_bytes(T_, c_) / 2**20 for T_ in lengths] for c_ in (1, 8)}
for c_, values in memory.items():
    print(f"context={c_}:", {T_: f"{m:.1f} MiB" for T_, m in zip(lengths, values)})
assert memory[8][-1] < memory[1][-1]
fig, ax = plt.subplots(figsize=(5, 3))
for c_, values in memory.items():
    ax.plot(lengths, values, marker="o", label="one device" if c_ == 1 else f"ring, context={c_} (per device)")
ax.set_xlabel("sequence length T")
ax.set_ylabel("temporaries, MiB")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise: the zigzag layout
#
# Write `zigzag(T, c)`: the natural position of each layout column, so that device `i` holds columns
# `i*T/c ... (i+1)*T/c - 1`. Cut the sequence into `2c` chunks; device `i` must hold chunk `i` and chunk
# `2c-1-i`, in that order. The check tests that it is a permutation, that every rank then scores the same
# number of causal pairs, that each device holds whole contiguous chunks, and that it is the layout the
# train step uses.

# %% answer
def zigzag(T, c):
    chunks = np.arange(T).reshape(2 * c, T // (2 * c))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * c - 1 - i]]) for i in range(c)])
# %% blank
def zigzag(T, c):
    return ...

# %%
lessons.check_zigzag(zigzag)
