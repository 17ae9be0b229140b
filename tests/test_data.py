"""Corpus reading, tokenizers, token cache and the deterministic batch order of TokenDataset."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picotron_jax.config import DataConfig
from picotron_jax.data import (
    ENDOFTEXT,
    ByteTokenizer,
    Corpus,
    HFTokenizer,
    TokenDataset,
    load_tokenizer,
    token_dtype,
    train_bpe_tokenizer,
)
from picotron_jax.errors import UserError

DOCS = ["alpha beta gamma\n" * 7, "def f(x):\n    return x * 2\n" * 5, "héllo wörld ✓\n" * 4]


def docs_of(source, **kw) -> list[str]:
    return list(Corpus.from_config(DataConfig(source=str(source), **kw)).documents())


def byte_stream(docs) -> np.ndarray:
    """What the byte tokenizer must produce: each document's UTF-8 bytes then the NUL end marker."""
    return np.frombuffer(b"".join(d.encode() + b"\0" for d in docs), np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.md").write_text(DOCS[1])
    (root / "b" / "a.txt").write_text(DOCS[0])
    (root / "c.py").write_text(DOCS[2])
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "empty.txt").write_text("")
    return root


def make_ds(tmp_path, text: str | None, seq_len: int, seed: int = 0) -> TokenDataset:
    """Build from tmp_path/c.txt, writing `text` there first unless it is None (rewriting changes the mtime)."""
    src = tmp_path / "c.txt"
    if text is not None:
        src.write_text(text)
    return TokenDataset.build(DataConfig(source=str(src), cache_dir=str(tmp_path / "cache")), seq_len, seed)


@pytest.fixture
def ds(tmp_path) -> TokenDataset:
    # 1001 tokens (1000 bytes + end marker), seq_len 10 -> 100 windows
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    return make_ds(tmp_path, text, seq_len=10, seed=3)


# ------------------------------------------------------------------------------------ corpus


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "t.txt").write_text(DOCS[0])
    assert docs_of(tmp_path / "t.txt") == [DOCS[0]]


def test_folder_is_recursive_sorted_and_skips_binaries_hidden_and_empty(folder):
    # sorted by relative path: b/a.txt, b/z.md, c.py; blob.bin (NUL), latin1.txt (not UTF-8), .git skipped
    assert docs_of(folder) == [DOCS[0], DOCS[1], DOCS[2]]
    names = [p.relative_to(folder).as_posix() for p in Corpus.from_config(DataConfig(source=str(folder))).files]
    assert ".git/HEAD" not in names and names == sorted(names)


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(DOCS)) + "\n\n")
    assert docs_of(path, text_field="body") == DOCS


def test_parquet_reads_the_text_column(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": DOCS + [None], "n": [1, 2, 3, 4]}), path)
    assert docs_of(path) == DOCS


def test_folder_reads_jsonl_and_parquet_as_records(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    pq.write_table(pa.table({"text": DOCS[1:]}), tmp_path / "b.parquet")
    assert docs_of(tmp_path) == DOCS


def test_stdlib_corpus_is_sorted_nontrivial_and_excludes_tests(tmp_path):
    corpus = Corpus.from_config(DataConfig(source="stdlib"))
    rel = [corpus._rel(p) for p in corpus.files]
    assert len(rel) > 300 and rel == sorted(rel)
    assert "os.py" in rel and "json/__init__.py" in rel
    assert not any(set(r.split("/")) & {"test", "tests", "idle_test", "site-packages"} for r in rel)
    # byte-level build of the whole stdlib: a few MB to a few tens of MB
    ds = TokenDataset.build(DataConfig(source="stdlib", cache_dir=str(tmp_path)), seq_len=256, seed=0)
    assert 2_000_000 < ds.num_tokens < 60_000_000
    first = next(b for b in (p.read_bytes() for p in corpus.files) if b)  # the stream starts with it + NUL
    np.testing.assert_array_equal(np.asarray(ds.tokens[: len(first) + 1]), np.frombuffer(first + b"\0", np.uint8))


def test_fingerprint_changes_with_content_and_is_stable_otherwise(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc")
    fp = lambda **kw: Corpus.from_config(DataConfig(source=str(path), **kw)).fingerprint()  # noqa: E731
    first = fp()
    assert fp() == first
    path.write_text("abcd")  # size changes
    second = fp()
    assert second != first
    st = path.stat()
    path.write_text("abce")  # same size: the mtime tells (set explicitly: coarse clocks may not tick)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert fp() != second


def test_fingerprint_ignores_where_the_tree_lives(tmp_path):
    for root in (tmp_path / "x", tmp_path / "y"):
        root.mkdir()
        (root / "a.txt").write_text("same")
        os.utime(root / "a.txt", ns=(10**18, 10**18))
    fps = [Corpus.from_config(DataConfig(source=str(tmp_path / r))).fingerprint() for r in "xy"]
    assert fps[0] == fps[1]


# ------------------------------------------------------------------------------- corpus errors


def user_error(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    return str(info.value)


def test_error_missing_source(tmp_path):
    msg = user_error(docs_of, tmp_path / "nope.txt")
    assert "nope.txt" in msg and "no such file or folder" in msg and "stdlib" in msg


def test_error_empty_file_and_empty_folder(tmp_path):
    (tmp_path / "e.txt").write_text("")
    assert "contains no text" in user_error(docs_of, tmp_path / "e.txt")
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "x.bin").write_bytes(b"\x00\xff")
    msg = user_error(docs_of, tmp_path / "bins")
    assert "contains no text" in msg and "1 binary or non-UTF-8 files were skipped" in msg


def test_error_binary_single_file(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\x00")
    assert "is not UTF-8 text" in user_error(docs_of, tmp_path / "x.txt")


def test_error_jsonl_missing_field_names_field_file_and_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    msg = user_error(docs_of, path)
    assert "'text'" in msg and str(path) in msg and "line 1" in msg and "body, id" in msg
    assert "data.text_field" in msg


def test_error_parquet_missing_column_names_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x"], "n": [1]}), path)
    msg = user_error(docs_of, path)
    assert "'text'" in msg and str(path) in msg and "content, n" in msg


def test_error_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    msg = user_error(docs_of, path)
    assert str(path) in msg and "line 3" in msg and "not valid JSON" in msg


def test_error_jsonl_line_not_an_object_or_not_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[1, 2]\n")
    assert "line 1 is a JSON list, not an object" in user_error(docs_of, path)
    path.write_text('{"text": 5}\n')
    assert "holds a int, expected a string" in user_error(docs_of, path)


def test_error_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    assert "not a readable parquet file" in user_error(docs_of, path)


# --------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_document_stream():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.eos_id == 0
    assert tok.decode(tok.encode(DOCS[2])) == DOCS[2]
    stream = np.concatenate(list(tok.encode_documents(DOCS)))
    np.testing.assert_array_equal(stream, byte_stream(DOCS))


def test_load_tokenizer_errors(tmp_path):
    msg = user_error(load_tokenizer, str(tmp_path / "missing.json"))
    assert "missing.json" in msg and "no such file" in msg and "'byte'" in msg
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    assert "not a valid Hugging Face tokenizer.json" in user_error(load_tokenizer, str(tmp_path / "bad.json"))


@pytest.fixture
def bpe(tmp_path) -> Path:
    (tmp_path / "train.txt").write_text("".join(DOCS) * 20)
    return train_bpe_tokenizer(DataConfig(source=str(tmp_path / "train.txt")), 300, tmp_path / "tok" / "tokenizer.json")


def test_bpe_training_is_deterministic_atomic_and_round_trips(tmp_path, bpe):
    again = train_bpe_tokenizer(DataConfig(source=str(tmp_path / "train.txt")), 300, tmp_path / "again.json")
    assert bpe.read_bytes() == again.read_bytes()
    assert sorted(os.listdir(bpe.parent)) == ["tokenizer.json"]  # no temporary file left behind
    tok = load_tokenizer(str(bpe.parent))  # a folder holding tokenizer.json works too
    assert isinstance(tok, HFTokenizer)
    assert 257 <= tok.vocab_size <= 300
    assert tok.eos_id == tok._tok.token_to_id(ENDOFTEXT) == 0
    text = "def f(x):\n    return héllo ✓ unseen-chars: ζ"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges learnt, bytes cover the rest
    stream = np.concatenate(list(tok.encode_documents(DOCS)))
    assert (stream == 0).sum() == len(DOCS) and stream[-1] == 0
    assert tok.fingerprint == load_tokenizer(str(bpe)).fingerprint != ByteTokenizer.fingerprint


def test_bpe_vocab_too_small(tmp_path):
    (tmp_path / "t.txt").write_text("abc")
    msg = user_error(train_bpe_tokenizer, DataConfig(source=str(tmp_path / "t.txt")), 100, tmp_path / "t.json")
    assert "vocab_size = 100" in msg and "257" in msg


def test_dataset_with_hf_tokenizer(tmp_path, bpe):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS * 5))
    cfg = DataConfig(source=str(tmp_path / "d.jsonl"), tokenizer=str(bpe), cache_dir=str(tmp_path / "cache"))
    ds = TokenDataset.build(cfg, seq_len=8, seed=0)
    tok = load_tokenizer(str(bpe))
    expected = np.concatenate([np.r_[tok.encode(d), tok.eos_id] for d in DOCS * 5])
    np.testing.assert_array_equal(np.asarray(ds.tokens), expected)
    assert ds.vocab_size == tok.vocab_size and ds.tokens.dtype == np.uint16


# ------------------------------------------------------------------------------------ dataset


def test_build_writes_the_token_stream(tmp_path, folder):
    ds = TokenDataset.build(DataConfig(source=str(folder), cache_dir=str(tmp_path / "cache")), 4, 0)
    np.testing.assert_array_equal(np.asarray(ds.tokens), byte_stream(DOCS))
    assert ds.num_tokens == len(byte_stream(DOCS)) and ds.vocab_size == 256
    assert ds.num_sequences == (ds.num_tokens - 1) // 4 and not ds.from_cache
    assert ds.path.parent == tmp_path / "cache" and ds.path.name.endswith(".uint16.bin")


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_windows_and_targets_are_offset_by_one(ds):
    batch = ds.batch_rows(0, 100, slice(None))
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (100, 10)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32 and batch["mask"].dtype == np.float32
    assert (batch["mask"] == 1).all()
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    tokens = np.asarray(ds.tokens)
    for row, window in enumerate(ds.window_index(np.arange(100))):
        np.testing.assert_array_equal(batch["inputs"][row], tokens[window * 10: window * 10 + 10])
        np.testing.assert_array_equal(batch["targets"][row], tokens[window * 10 + 1: window * 10 + 11])


def test_every_window_once_per_epoch_and_epochs_differ(ds):
    assert ds.num_sequences == 100
    epoch0, epoch1 = ds.window_index(np.arange(100)), ds.window_index(np.arange(100, 200))
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(100))


def test_same_seed_same_batch_other_seed_other_batch(tmp_path, ds):
    same = make_ds(tmp_path, None, seq_len=10, seed=3)
    other = make_ds(tmp_path, None, seq_len=10, seed=4)
    assert same.path == other.path == ds.path  # the seed does not change the token cache
    for step in (0, 7):
        a, b, c = (d.batch_rows(step, 8, slice(None))["inputs"] for d in (ds, same, other))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_resume_reads_the_same_batch_as_iterating_from_zero(tmp_path, ds):
    iterated = [ds.batch_rows(step, 12, slice(None)) for step in range(30)]  # 360 samples: wraps 3 epochs
    fresh = make_ds(tmp_path, None, seq_len=10, seed=3)
    assert fresh.from_cache
    for step in (29, 8, 0, 17):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(fresh.batch_rows(step, 12, slice(None))[key], iterated[step][key])


def test_epoch_wrap_inside_one_batch(ds):
    # batch 3 of size 32 = samples 96..127: 4 from epoch 0, 28 from epoch 1
    windows = ds.window_index(np.arange(96, 128))
    np.testing.assert_array_equal(windows[:4], ds.permutation(0)[96:])
    np.testing.assert_array_equal(windows[4:], ds.permutation(1)[:28])
    whole = ds.batch_rows(3, 32, slice(None))["inputs"]
    tokens = np.asarray(ds.tokens)
    np.testing.assert_array_equal(whole[5], tokens[windows[5] * 10: windows[5] * 10 + 10])


def test_rows_subset_equals_rows_of_full_batch(ds):
    full = ds.batch_rows(5, 16, slice(None))
    rows = np.array([1, 4, 5, 15])
    part = ds.batch_rows(5, 16, rows)
    for key in full:
        np.testing.assert_array_equal(part[key], full[key][rows])
    np.testing.assert_array_equal(ds.batch_rows(5, 16, slice(8, 12))["inputs"], full["inputs"][8:12])
    with pytest.raises(ValueError, match="rows must lie in"):
        ds.batch_rows(5, 16, [16])


def test_cache_is_reused_without_reading_or_tokenising(tmp_path, ds, monkeypatch):
    mtime = ds.path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(Corpus, "documents", boom)
    monkeypatch.setattr(ByteTokenizer, "encode_documents", boom)
    again = TokenDataset.build(DataConfig(source=str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "cache")), 10, 3)
    assert again.from_cache and again.path == ds.path and again.path.stat().st_mtime_ns == mtime
    assert again.num_tokens == ds.num_tokens


def test_changed_corpus_gets_a_new_cache_file(tmp_path, ds):
    again = make_ds(tmp_path, "something else entirely, and longer than before", seq_len=10, seed=3)
    assert again.path != ds.path and not again.from_cache


def test_interrupted_build_leaves_no_file(tmp_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("x" * 100)
    cache = tmp_path / "cache"

    def encode_then_die(self, docs):
        yield np.frombuffer(b"partial", np.uint8)
        raise KeyboardInterrupt

    monkeypatch.setattr(ByteTokenizer, "encode_documents", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        TokenDataset.build(DataConfig(source=str(src), cache_dir=str(cache)), 10, 0)
    assert os.listdir(cache) == []
    monkeypatch.undo()
    ds = TokenDataset.build(DataConfig(source=str(src), cache_dir=str(cache)), 10, 0)
    assert ds.num_tokens == 101
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]  # no temporary left behind


def test_error_corpus_shorter_than_one_window(tmp_path):
    msg = user_error(make_ds, tmp_path, "short", seq_len=64)
    assert "6 tokens" in msg and "train.seq_len = 64" in msg and "65" in msg and "c.txt" in msg


def test_error_corrupt_cache_file(tmp_path, ds):
    ds.path.write_bytes(b"\x01\x02\x03")  # odd size cannot be uint16 tokens
    msg = user_error(TokenDataset.build, DataConfig(source=str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "cache")),
                     10, 3)
    assert "corrupt" in msg and str(ds.path) in msg and "delete it" in msg


def test_error_unwritable_cache_dir(tmp_path):
    (tmp_path / "c.txt").write_text("x" * 50)
    (tmp_path / "file").write_text("")
    cfg = DataConfig(source=str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "file" / "sub"))
    assert "set data.cache_dir" in user_error(TokenDataset.build, cfg, 10, 0)
