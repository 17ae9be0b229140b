"""StoreDataset: the TokenDataset order (dataset.py) over a token store's shards, read through the cache.

The windows, their per-epoch permutation and the held-out tail are exactly TokenDataset's, over the
concatenated shards: a store trains bitwise like the plain token cache of the same corpus and
tokenizer, and like itself whatever its location (local folder, s3://, gs://). Sample s is a pure
function of (seed, store, s), so any number of processes, and any split of the global batch between
them, reads the same global batches; each process reads only the shards its own rows live in, and
tells the cache (cache.py) which shards its next steps need.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from picotron_jax.data.cache import ShardCache
from picotron_jax.data.dataset import TokenDataset, held_out_windows
from picotron_jax.data.store import TokenStore
from picotron_jax.errors import UserError


class StoreDataset(TokenDataset):
    """Random-access training windows over a TokenStore (same order as TokenDataset)."""

    def __init__(self, store: TokenStore, seq_len: int, seed: int, *, held_out: tuple[int, float] = (0, 0.0),
                 cache_dir: str | Path | None = None, disk_bytes: int = 0, memory_bytes: int = 1 << 30,
                 prefetch_steps: int = 0, horizon: int = 4096):
        if seq_len <= 0:
            raise UserError(f"train.seq_len = {seq_len}: must be positive")
        self.store = store
        self.path = Path(store.location)
        self.vocab_size = store.vocab_size
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.from_cache = True
        self.tokens = None  # never held whole: see take()
        self.num_tokens = store.num_tokens
        if self.num_tokens < seq_len + 1:
            raise UserError(f"data.source = {store.location!r} has {self.num_tokens} tokens but train.seq_len = "
                            f"{seq_len} needs at least {seq_len + 1}; use more data or a smaller train.seq_len")
        windows = (self.num_tokens - 1) // seq_len
        self.num_held_out = held_out_windows(held_out, windows, seq_len, store.location)
        self.num_sequences = windows - (self.num_held_out + 1 if self.num_held_out else 0)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._reader: tuple[int, np.ndarray] | None = None  # (global_batch, rows) this process reads
        self.cache = ShardCache(store, cache_dir=cache_dir, disk_bytes=disk_bytes, memory_bytes=memory_bytes,
                                prefetch_steps=prefetch_steps, plan=self.shards_for_step, horizon=horizon)

    # ------------------------------------------------------------------------------ planning

    def shards_for_samples(self, samples: np.ndarray) -> np.ndarray:
        """Sorted shards holding the windows of global samples `samples`."""
        start = self.window_index(samples) * self.seq_len
        return self.store.shards_of(start, start + self.seq_len + 1)

    def shards_for_step(self, step: int) -> np.ndarray:
        """Shards this process reads at `step` (its rows, as last asked by batch_rows)."""
        if self._reader is None:
            return np.zeros(0, np.int64)
        B, rows = self._reader
        return self.shards_for_samples(step * B + rows)

    # ------------------------------------------------------------------------------ reading

    def batch_rows(self, step: int, global_batch: int, rows) -> dict[str, np.ndarray]:
        if isinstance(rows, slice):
            rows = np.arange(global_batch)[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._reader is None or self._reader[0] != global_batch or not np.array_equal(self._reader[1], rows):
            self._reader = (int(global_batch), rows.copy())
            self.cache = self._fresh_plan()
        self.cache.at_step(step)
        return super().batch_rows(step, global_batch, rows)

    def _fresh_plan(self) -> ShardCache:
        """A new reader split (first call, or another share of the batch): the same tiers, a new future."""
        old = self.cache
        if old._planned == 0:
            return old
        old.close()
        return ShardCache(self.store, cache_dir=old.cache_dir,
                          disk_bytes=old.disk_bytes, memory_bytes=old.memory_bytes,
                          prefetch_steps=old.prefetch_steps, plan=self.shards_for_step, horizon=old.horizon)

    def take(self, offsets: np.ndarray) -> np.ndarray:
        """Tokens at corpus positions `offsets`, from the shards they live in (each read once)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        flat = offsets.reshape(-1)
        shard = flat // self.store.shard_tokens
        out = np.empty(flat.shape, self.store.dtype)
        for sh in np.unique(shard):
            sel = shard == sh
            out[sel] = self.cache.get(int(sh))[flat[sel] - int(sh) * self.store.shard_tokens]
        return out.reshape(offsets.shape)

    def close(self) -> None:
        self.cache.close()

    def __repr__(self) -> str:
        return (f"StoreDataset({self.store.location!r}, shards={self.store.num_shards}, tokens={self.num_tokens}, "
                f"seq_len={self.seq_len}, sequences={self.num_sequences}, seed={self.seed})")
