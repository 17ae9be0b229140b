# %% [markdown]
# # 14 Curriculum: sequence-length warm-up
#
# Early in training a model learns mostly local statistics; long contexts cost attention FLOPs and make the
# first steps less stable. **Sequence-length warm-up** (Li et al., "The Stability-Efficiency Dilemma",
# arXiv 2108.06084; DeepSpeed's curriculum scheduler) trains on short sequences first and grows them to
# `train.seq_len` by a pacing function. JAX compiles once per shape, so lengths are snapped down to a few
# **buckets**; with `constant_tokens` (default) each row of the usual batch is cut into `seq_len / L` rows of
# `L`, so every step trains on the same tokens, only with shorter contexts.

# %%
import math
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import matplotlib.pyplot as plt
import numpy as np

import picotron_jax as pj
from picotron_jax.data.curriculum import Curriculum
from picotron_jax.tutorials import scale

print(jax.device_count(), "devices")

# %% [markdown]
# ## Pacing functions and buckets
#
# With `d` the length at optimizer step `s` (1-based), `fixed_linear`: d = floor(s / steps x (seq_len -
# start) + start), rounded down to a multiple of `seq_len_step`, capped at `seq_len`; `fixed_root`: the same
# with (s / steps) ** (1 / root_degree), which grows fast first. The step then trains on the largest bucket
# not above `d`.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
for pacing, extra in (("fixed_linear", []), ("fixed_root", ["curriculum.root_degree=2"])):
    for constant in (True, False):
        c = pj.load_config("single", ["train.seq_len=128", "curriculum.kind=seqlen", f"curriculum.pacing={pacing}",
                                      "curriculum.start_seq_len=16", "curriculum.steps=100",
                                      "curriculum.seq_len_step=16", f"curriculum.constant_tokens={str(constant).lower()}",
                                      *extra]).curriculum
        cur = Curriculum(c, 128)
        ax.step(range(1, 121), [cur.length(s) for s in range(1, 121)], where="post",
                label=f"{pacing}, constant_tokens={constant}: buckets {cur.buckets(120)}")
ax.set_xlabel("optimizer step")
ax.set_ylabel("sequence length")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## A run with the warm-up
#
# A tiny model, `train.seq_len=32`, warm-up from 8 over 6 steps by 8: the buckets are 8, 16 and 32 (24 does
# not divide 32). Logged rows carry `seq_len` and `curriculum_stage`; every step trains on 8 x 32 = 256
# target tokens, at any length.

# %%
cfg = pj.load_config("single", ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                                "model.num_heads=4", "model.num_kv_heads=2", "train.seq_len=32",
                                "train.global_batch=8", "train.steps=8", "optimizer.warmup_steps=2",
                                "logging.progress=false", "logging.every=1", "monitor.tensorboard=false",
                                "curriculum.kind=seqlen", "curriculum.start_seq_len=8", "curriculum.steps=6",
                                "curriculum.seq_len_step=8"])
with pj.Trainer(cfg) as trainer:
    trainer.run()
    rows = [r for r in trainer.history if r["kind"] == "train"]
    short = trainer.callbacks.wrap_batches(trainer.built.batch)(0)
for r in rows:
    print(f"step {r['step']}: seq_len {r['seq_len']} (stage {r['curriculum_stage']}), loss {r['loss']:.4f}")
print("batch of step 1:", short["inputs"].shape, "=", short["inputs"].size, "tokens, as the full batch 8 x 32")
assert short["inputs"].size == 8 * 32

# %%
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], "o-", label="loss")
ax2 = ax.twinx()
ax2.step([r["step"] for r in rows], [r["seq_len"] for r in rows], "g", where="mid", label="seq_len")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax2.set_ylabel("seq_len", color="g")
plt.show()

# %% [markdown]
# ## Exercise: the length of a step
#
# Write `seq_len_at(step, c, seq_len)`: the length optimizer step `step` trains on under curriculum config `c`
# (fields `pacing` "fixed_linear" or "fixed_root", `start_seq_len`, `steps`, `seq_len_step`, `root_degree`,
# `constant_tokens`). Compute the pacing value d (past `c.steps` use `c.steps`), then the largest bucket not
# above d: buckets are the multiples of `seq_len_step` from `start_seq_len` up to `seq_len` (with
# `constant_tokens`, only those dividing `seq_len`), and the smallest bucket when d is below them all. The
# check compares with the curriculum at every step of several configurations and with the run above.

# %% answer
def seq_len_at(step, c, seq_len):
    degree = 1 if c.pacing == "fixed_linear" else c.root_degree
    s = min(step, c.steps)
    d = math.floor((s / c.steps) ** (1 / degree) * (seq_len - c.start_seq_len) + c.start_seq_len)
    d = min(d - d % c.seq_len_step, seq_len)
    buckets = [L for L in range(c.seq_len_step, seq_len + 1, c.seq_len_step)
               if L >= c.start_seq_len and (not c.constant_tokens or seq_len % L == 0)]
    return max([L for L in buckets if L <= d] or [buckets[0]])
# %% blank
def seq_len_at(step, c, seq_len):
    return ...

# %%
scale.check_seq_len(seq_len_at, rows, cfg.curriculum, cfg.train.seq_len)
