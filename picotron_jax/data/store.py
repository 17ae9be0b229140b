"""Token stores: a tokenised corpus as fixed-size shards plus an index, on a local folder, s3:// or gs://.

Layout of a store (every key under the store's location, see kv.py):

    index.json              the store is complete once this exists (written last)
    ledger.json             while `data prepare` runs: the shards already finished (resumption)
    shards/000000.bin ...   raw little-endian token ids (uint16 while the vocab fits, else uint32)

`index.json` holds the format, the tokenizer (spec, fingerprint, vocab size), the dtype, the shard
size in tokens, and per shard its key, token count and sha256; per input file its documents and
tokens. Every shard has exactly `shard_tokens` tokens except the last, so token t of the corpus
lives in shard t // shard_tokens at offset t % shard_tokens: random access needs no search.

The corpus is the concatenation of the shards, token for token the stream the plain token cache
(dataset.py) writes for the same source and tokenizer, so a store trains exactly like it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from picotron_jax.data.kv import KvLocation, is_remote
from picotron_jax.errors import UserError

FORMAT = "token-store-v1"
INDEX = "index.json"
LEDGER = "ledger.json"
DEFAULT_SHARD_TOKENS = 1 << 20


def shard_key(i: int) -> str:
    return f"shards/{i:06d}.bin"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    key: str
    tokens: int
    sha256: str


class TokenStore:
    """An opened, complete store: its index, and verified reads of its shards."""

    def __init__(self, location: str, *, latency_s: float = 0.0, retries: int = 8, kv: KvLocation | None = None):
        self.location = location
        self.kv = kv or KvLocation(location, latency_s=latency_s, retries=retries)
        raw = self.kv.read(INDEX)
        if raw is None:
            partial = self.kv.read(LEDGER) is not None
            if partial:
                raise UserError(f"data.source = {location!r} is a token store whose `data prepare` did not finish; "
                                f"run `picotron-jax data prepare --out {location}` again with the same options to "
                                f"complete it")
            raise UserError(f"data.source = {location!r}: no {INDEX} there, so it is not a prepared token store; "
                            f"make one with `picotron-jax data prepare --source SRC --out {location}`")
        try:
            index = json.loads(raw)
            if index.get("format") != FORMAT:
                raise ValueError(f"format {index.get('format')!r}")
            self.shards = tuple(ShardInfo(s["key"], int(s["tokens"]), s["sha256"]) for s in index["shards"])
            self.shard_tokens = int(index["shard_tokens"])
            self.dtype = np.dtype(index["dtype"])
            self.vocab_size = int(index["vocab_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"data.source = {location!r}: {INDEX} is not a {FORMAT} index ({exc}); prepare the "
                            f"store again with `picotron-jax data prepare`") from None
        self.index = index
        self.tokenizer = index.get("tokenizer", "")
        self.tokenizer_fingerprint = index.get("tokenizer_fingerprint", "")
        self.num_tokens = sum(s.tokens for s in self.shards)
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards])  # [num_shards + 1] token offsets

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_nbytes(self, i: int) -> int:
        return self.shards[i].tokens * self.dtype.itemsize

    def fetch(self, i: int) -> bytes:
        """The bytes of shard i from the store, checked against the index's sha256."""
        info = self.shards[i]
        data = self.kv.read(info.key)
        if data is None:
            raise UserError(f"data.source = {self.location!r}: shard {info.key} is missing; the store is incomplete "
                            f"or was partly deleted: prepare it again with `picotron-jax data prepare`")
        if len(data) != self.shard_nbytes(i) or sha256(data) != info.sha256:
            raise UserError(f"data.source = {self.location!r}: shard {info.key} is corrupt (checksum mismatch: "
                            f"{len(data)} bytes, index says {self.shard_nbytes(i)}); prepare the store again")
        return data

    def decode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=self.dtype.newbyteorder("<"))

    def shards_of(self, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """Sorted distinct shards holding any token of the ranges [start, stop)."""
        start, stop = np.asarray(start, np.int64).reshape(-1), np.asarray(stop, np.int64).reshape(-1)
        if start.size == 0:
            return np.zeros(0, np.int64)
        first = start // self.shard_tokens
        last = (stop - 1) // self.shard_tokens
        span = np.arange(int((last - first).max()) + 1)  # [m]
        every = first[:, None] + span[None, :]  # [r, m]
        return np.unique(every[every <= last[:, None]])

    def check_tokenizer(self, fingerprint: str, spec: str) -> None:
        """A store made with another tokenizer than the config's is refused (its ids mean other text)."""
        if fingerprint != self.tokenizer_fingerprint:
            raise UserError(f"data.source = {self.location!r} was prepared with tokenizer {self.tokenizer!r} but "
                            f"data.tokenizer = {spec!r} (another vocabulary); set data.tokenizer={self.tokenizer} "
                            f"or prepare the store with --tokenizer {spec}")

    def __repr__(self) -> str:
        return f"TokenStore({self.location!r}, shards={self.num_shards}, tokens={self.num_tokens})"


def is_store(location: str) -> bool:
    """True when `location` is s3:// / gs:// (always a store) or a local folder holding a store's index/ledger."""
    if is_remote(location):
        return True
    path = Path(location.removeprefix("file://")).expanduser()
    return path.is_dir() and ((path / INDEX).is_file() or (path / LEDGER).is_file())
