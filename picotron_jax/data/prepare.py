"""`picotron-jax data prepare`: tokenise a corpus into a token store (store.py), in parallel, resumably.

The input files (a source the trainer accepts, or a glob of many files) are tokenised one file per
task by a pool of CPU processes; the results come back in file order and are cut into shards of
exactly `shard_tokens` tokens. After each shard the ledger records the shards so far and where the
next one starts (file number, tokens of that file already in shards). An interrupted prepare run
again with the same options starts from there and writes the same store, byte for byte, as one
uninterrupted run (the shards are a pure function of the corpus, the tokenizer and the shard size).
`index.json` is written last: a store is usable only once complete.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from picotron_jax.config import DataConfig
from picotron_jax.data.corpus import Corpus, _jsonl_documents, _parquet_documents, _read_text
from picotron_jax.data.dataset import token_dtype
from picotron_jax.data.kv import KvLocation
from picotron_jax.data.store import DEFAULT_SHARD_TOKENS, FORMAT, INDEX, LEDGER, TokenStore, sha256, shard_key
from picotron_jax.data.tokenizer import load_tokenizer
from picotron_jax.errors import UserError

_GLOB_CHARS = "*?["


def list_corpus(source: str, text_field: str) -> Corpus:
    """The corpus of `source`: anything `data.source` accepts, or a glob such as 'data/**/*.jsonl'."""
    if any(c in source for c in _GLOB_CHARS) and not Path(source).exists():
        files = sorted(Path(p).absolute() for p in glob.glob(os.path.expanduser(source), recursive=True)
                       if Path(p).is_file())
        if not files:
            raise UserError(f"--source {source!r}: the glob matches no files; check the pattern (use ** for "
                            f"sub-folders)")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
        return Corpus(source, "folder", root, tuple(files), text_field)
    return Corpus.from_config(DataConfig(source=source, text_field=text_field))


def file_documents(corpus: Corpus, path: Path) -> Iterator[str]:
    """The non-empty documents of one file of the corpus, read as `Corpus.documents` reads it."""
    if path.suffix == ".jsonl":
        docs = _jsonl_documents(path, corpus.text_field)
    elif path.suffix == ".parquet":
        docs = _parquet_documents(path, corpus.text_field)
    else:
        text = _read_text(path)
        if text is None:
            if corpus.kind == "file":
                raise UserError(f"--source {corpus.source!r} is not UTF-8 text; convert it to UTF-8")
            return
        docs = iter((text,))
    for doc in docs:
        if doc:
            yield doc


# ------------------------------------------------------------------------------- worker side

_WORKER: dict = {}


def _init_worker(tokenizer_spec: str, corpus: Corpus) -> None:
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_spec)
    _WORKER["corpus"] = corpus


def _tokenize_file(task: tuple[int, str]) -> tuple[int, np.ndarray, int]:
    """(file number, tokens of the file as the store dtype, documents)."""
    i, path = task
    tok, corpus = _WORKER["tokenizer"], _WORKER["corpus"]
    dtype = token_dtype(tok.vocab_size)
    n_docs = 0

    def counted() -> Iterator[str]:
        nonlocal n_docs
        for doc in file_documents(corpus, Path(path)):
            n_docs += 1
            yield doc

    chunks = [c.astype(dtype, copy=False) for c in tok.encode_documents(counted())]
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    return i, tokens, n_docs


# ------------------------------------------------------------------------------- driver side


def write_shard(kv: KvLocation, i: int, data: bytes) -> None:
    """One shard to the store (a module function so a test can interrupt preparation here)."""
    kv.write(shard_key(i), data)


def prepare_store(source: str, out: str, *, tokenizer: str = "byte", text_field: str = "text",
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 0,
                  say: Callable[[str], None] = print) -> TokenStore:
    """Tokenise `source` into a store at `out` (local folder, s3://, gs://); resumes an interrupted run."""
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens = {shard_tokens}: must be positive (e.g. {DEFAULT_SHARD_TOKENS})")
    corpus = list_corpus(source, text_field)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    kv = KvLocation(out)
    params = {"format": FORMAT, "corpus": corpus.fingerprint(), "tokenizer_fingerprint": tok.fingerprint,
              "shard_tokens": shard_tokens, "dtype": dtype.name}

    existing = kv.read(INDEX)
    if existing is not None:
        index = json.loads(existing)
        if {k: index.get(k) for k in params} != params:
            raise UserError(f"--out {out!r} already holds a store of another corpus, tokenizer or shard size; "
                            f"choose an empty --out")
        say(f"{out}: already complete ({len(index['shards'])} shards)")
        return TokenStore(out, kv=kv)

    ledger = {"params": params, "shards": [], "files": [], "next_file": 0, "skip": 0}
    raw = kv.read(LEDGER)
    if raw is not None:
        ledger = json.loads(raw)
        if ledger.get("params") != params:
            raise UserError(f"--out {out!r} holds an unfinished store of another corpus, tokenizer or shard size; "
                            f"rerun with the options it was started with, or choose an empty --out")
        say(f"{out}: resuming after {len(ledger['shards'])} finished shards")

    shards: list[dict] = ledger["shards"]
    files: list[dict] = ledger["files"]
    start_file, skip = int(ledger["next_file"]), int(ledger["skip"])
    buffer: list[np.ndarray] = []  # tokens not yet in a shard
    buffered = 0
    pending: list[list[int]] = []  # [file number, its tokens still in the buffer], in order
    length: dict[int, int] = {}  # file number -> its whole token count

    def emit(tokens: np.ndarray) -> None:
        data = tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes()
        write_shard(kv, len(shards), data)
        shards.append({"key": shard_key(len(shards)), "tokens": int(tokens.size), "sha256": sha256(data)})

    tasks = [(i, str(p)) for i, p in enumerate(corpus.files) if i >= start_file]
    for i, tokens, n_docs in _run_tasks(tasks, tokenizer, corpus, workers):
        length[i] = int(tokens.size)
        files.append({"path": corpus._rel(corpus.files[i]), "documents": n_docs, "tokens": length[i]})
        if i == start_file and skip:
            tokens = tokens[skip:]
        if tokens.size and int(tokens.max()) >= tok.vocab_size:
            raise RuntimeError(f"token id {int(tokens.max())} >= vocab_size {tok.vocab_size}")
        buffer.append(tokens)
        buffered += tokens.size
        pending.append([i, int(tokens.size)])
        while buffered >= shard_tokens:
            joined = np.concatenate(buffer)
            emit(joined[:shard_tokens])
            buffer, buffered = [joined[shard_tokens:]], joined.size - shard_tokens
            used = shard_tokens
            while pending and (used or pending[0][1] == 0):  # files (partly) in the shard leave the front
                take = min(pending[0][1], used)
                pending[0][1] -= take
                used -= take
                if pending[0][1] == 0:
                    pending.pop(0)
            # the next shard starts in pending[0] (at its tokens already used) or at the next file
            nxt, off = (pending[0][0], length[pending[0][0]] - pending[0][1]) if pending else (i + 1, 0)
            kv.write(LEDGER, json.dumps({"params": params, "shards": shards, "files": files[:nxt],
                                         "next_file": nxt, "skip": off}).encode())
    if buffered:
        emit(np.concatenate(buffer))
    if not shards:
        raise UserError(f"--source {source!r} contains no text; point it at non-empty UTF-8 text")
    total_docs = sum(f["documents"] for f in files)
    index = {**params, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "source": source,
             "num_tokens": sum(s["tokens"] for s in shards), "num_documents": total_docs, "shards": shards,
             "files": files}
    kv.write(INDEX, json.dumps(index, indent=1).encode())
    kv.delete(LEDGER)
    say(f"{out}: {len(shards)} shards, {index['num_tokens']} tokens, {total_docs} documents")
    return TokenStore(out, kv=kv)


def _run_tasks(tasks: list[tuple[int, str]], tokenizer: str, corpus: Corpus,
               workers: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """Tokenised files in file order: in this process (workers <= 1) or a pool of `workers` processes."""
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(tokenizer, corpus)
        yield from map(_tokenize_file, tasks)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX/TensorStore threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, corpus)) as pool:
        yield from pool.imap(_tokenize_file, tasks, chunksize=1)
