"""`DataStats`: the token store's cache counters and a mixture's per-source tokens in every log row.

Added by `build_callbacks` (before the metrics file, so metrics.jsonl has the fields) when the run
trains from a token store or a mixture. Fields (plain numbers, cumulative since the run started):

    data_l1_hits, data_prefetch_hits, data_l2_hits   shard reads served by memory / prefetch / disk
    data_fetches, data_bytes_fetched                 shard reads from the store (L3)
    data_evictions                                   shards evicted from the disk cache
    data_corrupt_refetched                           cached shards that failed their checksum
    data_wait_s                                      seconds the reader waited for shard reads
    data_hit_rate, data_disk_bytes, data_prefetch_depth
    data_tokens_K                                    mixture: training tokens taken from source K

With a mixture the cache fields are summed over its stores.
"""

from __future__ import annotations

from picotron_jax.callback import Callback


def _caches(ds) -> list:
    if hasattr(ds, "datasets"):
        return [c for d in ds.datasets for c in _caches(d)]
    return [ds.cache] if hasattr(ds, "cache") else []


class DataStats(Callback):
    def on_log(self, trainer, row: dict) -> None:
        ds = getattr(trainer.built, "dataset", None)
        if ds is None or row.get("kind") != "train":
            return
        totals: dict[str, float] = {}
        for cache in _caches(ds):
            for k, v in cache.metrics().items():
                totals[k] = totals.get(k, 0) + v
        caches = _caches(ds)
        if caches:
            reads = sum(totals[k] for k in ("l1_hits", "prefetch_hits", "l2_hits", "fetches"))
            totals["hit_rate"] = (reads - totals["fetches"]) / reads if reads else 0.0
            totals["prefetch_depth"] = max(c.depth for c in caches)
        row.update({f"data_{k}": v for k, v in totals.items()})
        if hasattr(ds, "tokens_by_source"):
            by = ds.tokens_by_source(int(row["step"]), trainer.cfg.train.global_batch)
            row.update({f"data_tokens_{k}": n for k, n in enumerate(by.values())})
