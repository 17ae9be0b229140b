# %% [markdown]
# # 12 Data at scale: token stores, the shard cache, mixtures
#
# A corpus bigger than memory, or on object storage, is tokenised once into a **token store**: fixed-size
# shards plus an index (each shard's token count and sha256). Training reads windows from it through a tiered
# cache (decoded shards in memory, then a local-disk cache, then the store). Because batch *i* is a pure
# function of (seed, data, *i*), the shards every future step needs are known in advance, so the disk cache
# can evict the shard needed **furthest ahead** (Belady's optimal policy) instead of the least recently used.
# **Mixtures** draw each step's rows from several sources by weight. Nothing here needs a model: this lesson
# runs the data layer alone.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from picotron_jax.data.mixture import MixtureDataset, parse_mixture
from picotron_jax.data.prepare import prepare_store
from picotron_jax.data.store import TokenStore
from picotron_jax.data.store_dataset import StoreDataset
from picotron_jax.tutorials import scale

work = Path(tempfile.mkdtemp(prefix="picotron-lesson-12-"))
rng = np.random.default_rng(0)
corpus = work / "corpus"
corpus.mkdir()
for i in range(4):  # four files of JSON lines: "documents" of random words
    with open(corpus / f"part-{i}.jsonl", "w") as f:
        for _ in range(25):
            words = rng.choice(["data", "mesh", "shard", "cache", "token", "step", "jax", "grad"], 60)
            f.write(json.dumps({"text": " ".join(words)}) + "\n")

# %% [markdown]
# ## Prepare a store
#
# `prepare_store` is `picotron-jax data prepare --source ... --out ... --shard-tokens N --workers W`: the
# files are tokenised by W processes (the byte tokenizer here) and cut into shards of N tokens; the index is
# written last. The store is the same byte for byte whatever the number of workers. `--out` may be a local
# folder, `s3://bucket/prefix` or `gs://bucket/prefix`.

# %%
say = lambda _m: None  # noqa: E731 - quiet
one = prepare_store(str(corpus / "*.jsonl"), str(work / "store-1"), shard_tokens=1000, workers=1, say=say)
two = prepare_store(str(corpus / "*.jsonl"), str(work / "store-2"), shard_tokens=1000, workers=2, say=say)
print(one.num_shards, "shards,", one.num_tokens, "tokens, vocabulary", one.vocab_size)
print("shard 0:", one.shards[0])
same = all(a.sha256 == b.sha256 for a, b in zip(one.shards, two.shards)) and one.num_shards == two.num_shards
print("1 worker and 2 workers wrote the same shards:", same)
assert same

# %% [markdown]
# ## The shard cache: Belady against LRU
#
# Two epochs of shuffled windows of 100 tokens, 4 per step, with a disk cache of 4 shards (about 10% of the
# store) and no memory tier. Every step records which shards it read; the cache counts its fetches from
# the store. An LRU cache of the same size, replayed on the same accesses, is shown for comparison.

# %%
store = TokenStore(str(work / "store-1"))
shard_bytes = store.shard_nbytes(0)
capacity, B = 4, 4
ds = StoreDataset(store, 100, seed=1, cache_dir=work / "cache", disk_bytes=capacity * shard_bytes, memory_bytes=0)
accesses = []
for step in range(2 * ds.num_sequences // B):
    ds.batch_rows(step, B, slice(None))
    accesses += [int(s) for s in ds.shards_for_step(step)]
fetches = ds.cache.stats["fetches"]
ds.close()


lru = scale.lru_reads(accesses, capacity)
print(f"{len(accesses)} shard reads asked; the cache fetched {fetches}, LRU would fetch {lru}")
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.bar(["asked", "LRU", "this cache"], [len(accesses), lru, fetches])
ax.set_ylabel("shard reads from the store")
plt.show()

# %% [markdown]
# ## Mixtures
#
# `data.mixture` lists sources with weights; a source's `schedule` is piecewise linear in the step. At each
# step the rows per source are a multinomial draw with the normalised weights from a generator seeded by
# (`train.seed`, step): exact in expectation, identical across runs, process counts and resumes, and each
# source is read in its own order without repeats. Here a "web" store at weight 0.7 and a "code" store whose
# weight goes from 0.3 to 0.6 over 200 steps.

# %%
code = prepare_store(str(corpus / "part-0.jsonl"), str(work / "code"), shard_tokens=1000, say=say)
mixture = parse_mixture([{"source": "web", "weight": 0.7},
                         {"source": "code", "weight": 0.3, "schedule": [[0, 0.3], [200, 0.6]]}])
mix = MixtureDataset([StoreDataset(one, 32, 1), StoreDataset(code, 32, 1)], [p for _, p in mixture], seed=1,
                     names=["web", "code"])
steps, B = 240, 16
code_rows = np.array([np.sum(mix.sources(s, B)[0] == 1) for s in range(steps)])
expected = np.array([mix.probabilities(s)[1] for s in range(steps)])
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(np.convolve(code_rows / B, np.ones(20) / 20, mode="valid"), label="rows from code (20-step mean)")
ax.plot(expected, label="normalised weight")
ax.set_xlabel("step")
ax.legend()
plt.show()
print("tokens per source after", steps, "steps:", mix.tokens_by_source(steps, B))
again = MixtureDataset(mix.datasets, mix.schedules, seed=1)
assert all((again.sources(s, B)[0] == mix.sources(s, B)[0]).all() for s in (0, 57, 239))  # a pure function of the step

# %% [markdown]
# ## Exercise: the fewest reads possible
#
# Write `fewest_reads(accesses, capacity)`: the smallest number of store reads any cache with room for
# `capacity` shards can achieve on the access sequence, **knowing the future**. A shard already held costs
# nothing; a read shard may be kept (evicting one when full) or not kept at all. Hint: Belady: when full,
# compare the next use of every held shard and of the new one; whichever is needed furthest ahead (or never)
# is the one not to hold. The check compares with an exhaustive search on small sequences, then with this
# run: the cache must have fetched no fewer than your minimum, and at most 1.1x it.

# %% answer
def fewest_reads(accesses, capacity):
    following, last = [0] * len(accesses), {}
    for pos in range(len(accesses) - 1, -1, -1):
        following[pos] = last.get(accesses[pos], float("inf"))
        last[accesses[pos]] = pos
    held, reads = {}, 0
    for pos, shard in enumerate(accesses):
        if shard not in held:
            reads += 1
            if len(held) >= capacity:
                far = max(held, key=held.get)
                if held[far] <= following[pos]:
                    continue  # the new shard is needed last: do not keep it
                del held[far]
        held[shard] = following[pos]
    return reads
# %% blank
def fewest_reads(accesses, capacity):
    return ...

# %%
scale.check_fewest_reads(fewest_reads, accesses, capacity, fetches)
