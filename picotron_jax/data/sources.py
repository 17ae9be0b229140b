"""Which dataset a config trains on: a mixture, a prepared token store, or a corpus tokenised on the fly.

* `data.mixture` non-empty: a MixtureDataset (mixture.py) of its sources, each opened as below.
* `data.source` s3:// / gs://, or a local folder holding a store's index.json: a StoreDataset
  (store_dataset.py); remote stores get the local-disk shard cache (`data.cache_bytes` under
  `data.cache_dir`), every store the memory cache (`data.memory_bytes`) and the prefetcher
  (`data.prefetch_steps`).
* anything else: the plain token cache (dataset.py), as before.
"""

from __future__ import annotations

import dataclasses

from picotron_jax.config import DataConfig
from picotron_jax.data.dataset import DEFAULT_CACHE_DIR, TokenDataset
from picotron_jax.data.kv import is_remote
from picotron_jax.data.mixture import MixtureDataset, parse_mixture
from picotron_jax.data.store import TokenStore, is_store
from picotron_jax.data.store_dataset import StoreDataset
from picotron_jax.data.tokenizer import load_tokenizer
from picotron_jax.errors import UserError


def open_dataset(data_cfg: DataConfig, seq_len: int, seed: int, held_out: tuple[int, float] = (0, 0.0)):
    """The training dataset of `data_cfg` (see the module docstring)."""
    for name in ("cache_bytes", "memory_bytes", "prefetch_steps"):
        if getattr(data_cfg, name) < 0:
            raise UserError(f"config field 'data.{name}' = {getattr(data_cfg, name)}: must be >= 0")
    if data_cfg.mixture:
        if held_out[0] > 0 or held_out[1] > 0:
            raise UserError("eval with data.mixture is not supported (which source would be held out?); set "
                            "eval.tokens=0 and eval.fraction=0, or evaluate on one source with data.source")
        entries = parse_mixture(data_cfg.mixture)
        datasets = [open_dataset(dataclasses.replace(data_cfg, source=src, mixture=[]), seq_len, seed)
                    for src, _ in entries]
        return MixtureDataset(datasets, [p for _, p in entries], seed, [src for src, _ in entries])
    if is_store(data_cfg.source):
        return open_store(data_cfg, seq_len, seed, held_out)
    return TokenDataset.build(data_cfg, seq_len, seed, held_out=held_out)


def open_store(data_cfg: DataConfig, seq_len: int, seed: int, held_out: tuple[int, float] = (0, 0.0),
               *, latency_s: float = 0.0) -> StoreDataset:
    store = TokenStore(data_cfg.source, latency_s=latency_s)
    tok = load_tokenizer(data_cfg.tokenizer)
    store.check_tokenizer(tok.fingerprint, data_cfg.tokenizer)
    remote = is_remote(data_cfg.source)
    return StoreDataset(store, seq_len, seed, held_out=held_out,
                        cache_dir=(data_cfg.cache_dir or DEFAULT_CACHE_DIR) if remote else None,
                        disk_bytes=data_cfg.cache_bytes if remote else 0, memory_bytes=data_cfg.memory_bytes,
                        prefetch_steps=data_cfg.prefetch_steps)
