"""Token stores on s3:// (TensorStore's s3 driver) against a moto S3 server on 127.0.0.1, as the checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from helpers import free_port, moto_server, preset  # noqa: E402
from picotron_jax.config import DataConfig  # noqa: E402
from picotron_jax.data.prepare import prepare_store  # noqa: E402
from picotron_jax.data.sources import open_dataset  # noqa: E402
from picotron_jax.data.store import TokenStore  # noqa: E402
from picotron_jax.data.store_dataset import StoreDataset  # noqa: E402
from picotron_jax.errors import UserError  # noqa: E402
from picotron_jax.run import build_run  # noqa: E402
from picotron_jax.train.state import init_train_state  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint():
    yield from moto_server()


@pytest.fixture(scope="module")
def stores(s3_endpoint, tmp_path_factory):
    """The same corpus prepared into a local folder and into s3://data-store/tokens."""
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": s3_endpoint}.items():
        mp.setenv(key, value)
    tmp = tmp_path_factory.mktemp("s3data")
    rng = np.random.default_rng(0)
    (tmp / "c.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 4000)))
    boto3.client("s3").create_bucket(Bucket="data-store")
    url = "s3://data-store/tokens"
    prepare_store(str(tmp / "c.txt"), url, shard_tokens=2048, say=lambda _m: None)
    prepare_store(str(tmp / "c.txt"), str(tmp / "local"), shard_tokens=2048, say=lambda _m: None)
    yield url, str(tmp / "local"), tmp
    mp.undo()


def test_prepare_writes_the_same_store_to_s3_and_reads_it_back(stores):
    url, local, _ = stores
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="data-store")["Contents"])
    assert "tokens/index.json" in keys and "tokens/shards/000000.bin" in keys and "tokens/ledger.json" not in keys
    a, b = TokenStore(url), TokenStore(local)
    assert a.index["shards"] == b.index["shards"] and a.num_shards >= 5
    for i in range(a.num_shards):
        assert a.fetch(i) == b.fetch(i)


@pytest.mark.slow  # one compile of the step (20-70 s on the loaded 2-core VM)
def test_training_from_s3_equals_training_from_a_local_store(stores):
    url, local, tmp = stores
    small = ["model.num_layers=1", "train.global_batch=8", f"data.cache_dir={tmp / 'cache'}"]
    runs = [build_run(preset("single", f"data.source={src}", *small)) for src in (local, url)]
    assert all(isinstance(r.dataset, StoreDataset) for r in runs)
    assert runs[1].dataset.cache.dir is not None and runs[0].dataset.cache.dir is None  # remote: disk cache
    losses = []
    for run in runs:
        state = init_train_state(run.cfg, runs[0].setup)
        out = []
        for i in range(3):
            state, metrics = runs[0].step(state, run.batch(i), i + 1)
            out.append(float(metrics["loss"]))
        losses.append(out)
    assert losses[0] == losses[1]
    assert runs[1].dataset.cache.stats["fetches"] > 0 and any(Path(tmp / "cache").rglob("*.bin"))


def test_s3_store_batches_equal_local_ones_with_a_small_disk_cache(stores, tmp_path):
    url, local, _ = stores
    cfg = DataConfig(source=url, cache_dir=str(tmp_path), cache_bytes=2 * 4096, prefetch_steps=2)
    remote, plain = open_dataset(cfg, 32, 3), open_dataset(DataConfig(source=local), 32, 3)
    for step in range(0, 2 * remote.num_sequences // 8, 3):
        for k, v in plain.batch_rows(step, 8, slice(None)).items():
            np.testing.assert_array_equal(remote.batch_rows(step, 8, slice(None))[k], v)
        assert sum(f.stat().st_size for f in tmp_path.rglob("*.bin")) <= 2 * 4096
    remote.close()


def test_unreachable_store_is_a_clear_error(stores, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(UserError, match=r"data store 's3://data-store/tokens': cannot read 'index.json'"):
        TokenStore("s3://data-store/tokens", retries=1)
