"""s3:// checkpoints through TensorStore's s3 driver, against a moto S3 server on 127.0.0.1."""

from __future__ import annotations


import jax
import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from helpers import moto_server, preset, setup  # noqa: E402
from picotron_jax.checkpoint.inspect import list_steps  # noqa: E402
from picotron_jax.checkpoint.manager import Checkpointer  # noqa: E402
from picotron_jax.checkpoint.restore import restore_train_state  # noqa: E402
from picotron_jax.train.state import init_train_state  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint():
    yield from moto_server()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": s3_endpoint, "XDG_CACHE_HOME": str(tmp_path / "cache-a")}.items():
        monkeypatch.setenv(key, value)
    name = f"ckpt-{tmp_path.name.lower().replace('_', '-')[:40]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def test_s3_save_prune_and_restore_on_a_fresh_machine(bucket, monkeypatch, tmp_path):
    cfg = preset("single", "checkpoint.keep=1", "checkpoint.keep_every=2", "checkpoint.every=1")
    _, st = setup(cfg)
    state = init_train_state(cfg, st)
    url = f"s3://{bucket}/runs/a"
    ckpt = Checkpointer(url, cfg, say=lambda _m: None)
    for s in (1, 2, 3):
        ckpt.save(state.replace(step=state.step + s), {"mesh": "single"})
    ckpt.close()
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted({k.split("/")[2] for k in keys}) == ["2", "3"]  # newest 1, plus multiples of 2
    assert "runs/a/3/_UPLOADED" in keys and any(k.startswith("runs/a/3/state/") for k in keys)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))  # another machine: empty staging folder
    restored, meta, where = restore_train_state(url, st.abstract, st.shardings, cfg)
    assert where == f"{url}/3" and int(restored.step) == 3 and meta["step"] == 3
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored, _, _ = restore_train_state(f"{url}/2", st.abstract, st.shardings, cfg)
    assert int(restored.step) == 2
    rows = list_steps(url)
    assert [r["step"] for r in rows] == [2, 3] and all(r["valid"] == "metadata ok" for r in rows)
