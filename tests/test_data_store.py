"""Token stores: `data prepare` (shards + index, parallel, resumable) and training from a store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, preset
from picotron_jax.config import DataConfig
from picotron_jax.data import TokenDataset
from picotron_jax.data import prepare as prepare_mod
from picotron_jax.data.prepare import prepare_store
from picotron_jax.data.sources import open_dataset
from picotron_jax.data.store import TokenStore
from picotron_jax.data.store_dataset import StoreDataset
from picotron_jax.errors import UserError
from picotron_jax.run import build_run
from picotron_jax.train.state import init_train_state

WORDS = ("alpha", "beta", "gamma", "delta", "héllo", "wörld")


def make_corpus(root: Path, files: int = 12, seed: int = 0) -> Path:
    """A folder of `files` text files of different lengths (one document each) plus a .jsonl of 5 records."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"f{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, 100 + 37 * i)))
    with open(root / "records.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, 50 + i))}) + "\n")
    return root


def all_tokens(store: TokenStore) -> np.ndarray:
    return np.concatenate([store.decode(store.fetch(i)) for i in range(store.num_shards)])


def store_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "c")


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    prepare_store(str(corpus), str(out), shard_tokens=700, say=lambda _m: None)
    return out


def test_shards_and_index_round_trip_to_direct_tokenisation(corpus, store, tmp_path):
    st = TokenStore(str(store))
    direct = TokenDataset.build(DataConfig(source=str(corpus), cache_dir=str(tmp_path / "tc")), 16, 0)
    np.testing.assert_array_equal(all_tokens(st), np.asarray(direct.tokens))
    assert st.num_shards > 10 and all(s.tokens == 700 for s in st.shards[:-1]) and 0 < st.shards[-1].tokens <= 700
    index = st.index
    assert index["num_tokens"] == direct.num_tokens and index["num_documents"] == 12 + 5
    assert [f["documents"] for f in index["files"]] == [1] * 12 + [5]
    assert sum(f["tokens"] for f in index["files"]) == direct.num_tokens
    assert not (store / "ledger.json").exists()


def test_parallel_prepare_writes_the_same_store(corpus, store, tmp_path):
    out = tmp_path / "p"
    prepare_store(str(corpus), str(out), shard_tokens=700, workers=2, say=lambda _m: None)
    assert store_files(out) == store_files(store)


def test_interrupted_prepare_resumes_to_the_same_store(corpus, store, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real = prepare_mod.write_shard
    written = []

    def dying(kv, i, data):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(i)
        real(kv, i, data)

    monkeypatch.setattr(prepare_mod, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(str(corpus), str(out), shard_tokens=700, say=lambda _m: None)
    assert (out / "ledger.json").exists() and not (out / "index.json").exists()
    with pytest.raises(UserError, match="did not finish"):
        TokenStore(str(out))
    monkeypatch.setattr(prepare_mod, "write_shard", lambda kv, i, data: (written.append(i), real(kv, i, data)))
    prepare_store(str(corpus), str(out), shard_tokens=700, say=lambda _m: None)
    assert written[:5] == [0, 1, 2, 3, 4] and written[5] == 5  # resumed after the 5 finished shards
    assert store_files(out) == store_files(store)
    with pytest.raises(UserError, match="another corpus, tokenizer or shard size"):
        prepare_store(str(corpus), str(out), shard_tokens=500, say=lambda _m: None)


def test_glob_source_and_cli(corpus, tmp_path):
    out = tmp_path / "g"
    proc = subprocess.run([sys.executable, "-m", "picotron_jax.cli", "data", "prepare", "--source",
                           str(corpus / "f0*.txt"), "--out", str(out), "--shard-tokens", "1000", "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    st = TokenStore(str(out))
    assert [f["path"] for f in st.index["files"]] == [f"f{i:02d}.txt" for i in range(10)]
    direct = b"".join((corpus / f"f{i:02d}.txt").read_bytes() + b"\0" for i in range(10))
    np.testing.assert_array_equal(all_tokens(st), np.frombuffer(direct, np.uint8))


def test_store_batches_equal_the_token_cache_batches(corpus, store, tmp_path):
    held = (64, 0.0)
    plain = TokenDataset.build(DataConfig(source=str(corpus), cache_dir=str(tmp_path / "tc")), 16, 5, held_out=held)
    ds = open_dataset(DataConfig(source=str(store)), 16, 5, held_out=held)
    assert isinstance(ds, StoreDataset) and ds.num_sequences == plain.num_sequences
    B = 8
    steps = ds.num_sequences // B + 3  # crosses an epoch
    for step in range(steps):
        a, b = plain.batch_rows(step, B, slice(None)), ds.batch_rows(step, B, slice(None))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for i in range(ds.eval_batches(B)):
        a, b = plain.eval_rows(i, B, slice(None)), ds.eval_rows(i, B, slice(None))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_training_from_a_store_equals_training_from_the_corpus(corpus, store, tmp_path):
    """build_run picks a StoreDataset for data.source=STORE; one compiled step trains on both runs' batches."""
    runs = [build_run(preset("single", f"data.source={src}", f"data.cache_dir={tmp_path / 'tc'}",
                             "train.global_batch=8", "model.num_layers=1")) for src in (str(corpus), str(store))]
    assert isinstance(runs[1].dataset, StoreDataset) and not isinstance(runs[0].dataset, StoreDataset)
    losses = []
    for run in runs:
        state = init_train_state(run.cfg, runs[0].setup)
        out = []
        for i in range(2):
            state, metrics = runs[0].step(state, run.batch(i), i + 1)
            out.append(float(metrics["loss"]))
        losses.append(out)
    assert losses[0] == losses[1]


def test_bad_stores_are_clear_errors(corpus, store, tmp_path):
    with pytest.raises(UserError, match="not a prepared token store"):
        TokenStore(str(tmp_path))
    bad = tmp_path / "bad"
    prepare_store(str(corpus), str(bad), shard_tokens=700, say=lambda _m: None)
    (bad / "shards" / "000002.bin").write_bytes(b"\1\2" * 700)
    st = TokenStore(str(bad))
    with pytest.raises(UserError, match="000002.bin is corrupt"):
        st.fetch(2)
    (bad / "shards" / "000003.bin").unlink()
    with pytest.raises(UserError, match="000003.bin is missing"):
        st.fetch(3)
    tok = tmp_path / "tok.json"
    from picotron_jax.data import train_bpe_tokenizer

    train_bpe_tokenizer(DataConfig(source=str(corpus)), 300, str(tok))
    with pytest.raises(UserError, match=r"prepared with tokenizer 'byte' but data.tokenizer"):
        open_dataset(DataConfig(source=str(store), tokenizer=str(tok)), 16, 0)
