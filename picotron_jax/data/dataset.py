"""TokenDataset: a flat, memory-mapped token file with random access to any batch of any step.

Levanter-style random access instead of a stateful iterator: sample s of the run is

    epoch e = s // num_sequences,  window = perm_e[s % num_sequences],
    perm_e  = permutation of range(num_sequences) from numpy's Generator seeded by (seed, e),

and window j holds tokens [j*seq_len, j*seq_len + seq_len + 1) (non-overlapping; the last
token of window j is the first of window j+1, so no token is wasted as a target). Batch i of
size B is samples i*B .. i*B+B-1, a pure function of (seed, corpus, i): resuming at step i reads
batch i directly, and each host reads only the rows its devices hold.

Validation (`eval.tokens` / `eval.fraction`): the last windows of the file are held out, in order,
after one skipped guard window, so no held-out token is ever an input or a target of training:

    windows [0, num_sequences)          training (permuted as above)
    window  num_sequences               guard (its first token is the last training target)
    windows num_sequences + 1 + r       held-out row r, r < num_held_out

The token file is made once per (corpus, tokenizer) and cached, named by the hash of both
fingerprints; it is written to a temporary name and renamed, so an interrupted run never leaves
a half file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from picotron_jax.config import DataConfig
from picotron_jax.data.corpus import Corpus
from picotron_jax.data.tokenizer import load_tokenizer
from picotron_jax.errors import UserError

DEFAULT_CACHE_DIR = "~/.cache/picotron_jax/tokens"
_FORMAT = "tokens-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536): half the disk and page cache of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class TokenDataset:
    """Random-access training windows over a token file (see the module docstring for the order)."""

    def __init__(
        self, path: str | Path, vocab_size: int, seq_len: int, seed: int, *, from_cache: bool = True, source: str = "",
        held_out: tuple[int, float] = (0, 0.0),
    ):
        if seq_len <= 0:
            raise UserError(f"train.seq_len = {seq_len}: must be positive")
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.from_cache = from_cache  # False when this build tokenised the corpus
        dtype = token_dtype(vocab_size)
        size = self.path.stat().st_size
        if size % dtype.itemsize or size == 0:
            raise UserError(f"token cache file {self.path} is corrupt ({size} bytes); delete it to rebuild")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")  # [num_tokens]
        self.num_tokens = int(self.tokens.shape[0])
        if self.num_tokens < seq_len + 1:
            what = f"data.source = {source!r}" if source else "the corpus"
            raise UserError(
                f"{what} has {self.num_tokens} tokens but train.seq_len = {seq_len} needs at least {seq_len + 1} "
                f"(one window of seq_len + 1); use more data or a smaller train.seq_len"
            )
        windows = (self.num_tokens - 1) // seq_len
        self.num_held_out = held_out_windows(held_out, windows, seq_len, source)
        self.num_sequences = windows - (self.num_held_out + 1 if self.num_held_out else 0)  # training windows
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # batch_rows may run on a prefetch thread and the main thread

    @classmethod
    def build(cls, data_cfg: DataConfig, seq_len: int, seed: int, held_out: tuple[int, float] = (0, 0.0)) -> TokenDataset:
        """Open the cached token file for (corpus, tokenizer), tokenising the corpus first if there is none."""
        if seq_len <= 0:
            raise UserError(f"train.seq_len = {seq_len}: must be positive")
        corpus = Corpus.from_config(data_cfg)
        tokenizer = load_tokenizer(data_cfg.tokenizer)
        key = hashlib.sha256(f"{_FORMAT}\n{corpus.fingerprint()}\n{tokenizer.fingerprint}".encode()).hexdigest()
        dtype = token_dtype(tokenizer.vocab_size)
        cache_dir = Path(data_cfg.cache_dir or DEFAULT_CACHE_DIR).expanduser()
        path = cache_dir / f"{key[:32]}.{dtype.name}.bin"
        from_cache = path.is_file()
        if not from_cache:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(
                    f"cannot create the token cache folder {cache_dir} ({exc.strerror}); set data.cache_dir to a "
                    f"writable folder"
                ) from None
            num_tokens = _write_tokens(path, corpus, tokenizer, dtype)
            meta = {"format": _FORMAT, "source": data_cfg.source, "text_field": data_cfg.text_field,
                    "tokenizer": data_cfg.tokenizer, "vocab_size": tokenizer.vocab_size,
                    "dtype": dtype.name, "num_tokens": num_tokens}
            _atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())  # for people only
        return cls(path, tokenizer.vocab_size, seq_len, seed, from_cache=from_cache, source=data_cfg.source,
                   held_out=held_out)

    # ------------------------------------------------------------------------------ order

    def permutation(self, epoch: int) -> np.ndarray:
        """perm_e: the order of windows in epoch e (kept for the two most recent epochs)."""
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed % (1 << 64), epoch]))
                perm = rng.permutation(self.num_sequences)
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def window_index(self, samples: np.ndarray) -> np.ndarray:
        """Window number of each global sample number (sample s = step * global_batch + row)."""
        samples = np.asarray(samples, dtype=np.int64)
        epochs, within = np.divmod(samples, self.num_sequences)
        out = np.empty_like(samples)
        for e in np.unique(epochs):  # a batch spans at most a couple of epochs
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    # ------------------------------------------------------------------------------ reading

    def batch_rows(self, step: int, global_batch: int, rows: slice | np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Rows `rows` of batch `step` (of `global_batch` rows): inputs/targets int32, mask float32, each [r, seq_len].

        Only those rows are read from the memory map, so a host touches just its share of the batch.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if isinstance(rows, slice):
            rows = np.arange(global_batch)[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= global_batch):
            raise ValueError(f"rows must lie in [0, {global_batch}), got {rows.min()}..{rows.max()}")
        return self.sample_rows(step * global_batch + rows)

    def sample_rows(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """Training rows of the global sample numbers `samples` (sample s -> window window_index(s))."""
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        windows = self.window_index(samples)  # [r]
        offsets = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # [r, seq_len + 1]
        tokens = self.take(offsets).astype(np.int32)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "mask": np.ones((samples.size, self.seq_len), np.float32),  # packed data: every token is real
        }

    def eval_rows(self, index: int, batch: int, rows: slice | np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Rows `rows` of held-out batch `index` (of `batch` rows each, in order). Rows past the last
        held-out window (the last batch's padding) repeat window 0 of the split with mask 0."""
        if isinstance(rows, slice):
            rows = np.arange(batch)[rows]
        r = index * batch + np.asarray(rows, dtype=np.int64).reshape(-1)
        real = r < self.num_held_out
        windows = self.num_sequences + 1 + np.where(real, r, 0)
        offsets = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        tokens = self.take(offsets).astype(np.int32)
        mask = np.repeat(real.astype(np.float32)[:, None], self.seq_len, axis=1)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}

    def take(self, offsets: np.ndarray) -> np.ndarray:
        """Tokens at the corpus positions `offsets` (any shape); fancy indexing reads only these pages."""
        return self.tokens[offsets]

    def eval_batches(self, batch: int) -> int:
        return -(-self.num_held_out // batch)

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path.name}, tokens={self.num_tokens}, vocab={self.vocab_size}, "
                f"seq_len={self.seq_len}, sequences={self.num_sequences}, seed={self.seed})")


def held_out_windows(held_out: tuple[int, float], windows: int, seq_len: int, source: str = "") -> int:
    """Windows held out for validation: ceil(tokens / seq_len), or floor(fraction x windows) (at least one)."""
    tokens, fraction = held_out
    if tokens <= 0 and fraction <= 0:
        return 0
    n = -(-tokens // seq_len) if tokens > 0 else max(1, int(fraction * windows))
    if n + 2 > windows:  # one guard window and at least one training window remain
        what = f"data.source = {source!r}" if source else "the corpus"
        asked = f"eval.tokens = {tokens}" if tokens > 0 else f"eval.fraction = {fraction}"
        raise UserError(f"{asked} holds out {n} windows of train.seq_len = {seq_len} tokens, but {what} has only "
                        f"{windows}; hold out fewer (at most {max(windows - 2, 0)} windows, "
                        f"eval.tokens={max(windows - 2, 0) * seq_len}) or use more data")
    return n


# ------------------------------------------------------------------------------------ writing


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_tokens(path: Path, corpus: Corpus, tokenizer, dtype: np.dtype) -> int:
    """Tokenise the corpus into `path` via a temporary file + os.replace; returns the token count."""
    tmp = _tmp_name(path)
    total = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in tokenizer.encode_documents(corpus.documents()):
                if chunk.size and int(chunk.max()) >= tokenizer.vocab_size:  # would wrap around in uint16
                    raise RuntimeError(f"token id {int(chunk.max())} >= vocab_size {tokenizer.vocab_size}")
                f.write(chunk.astype(dtype, copy=False).tobytes())
                total += chunk.size
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see no file or the whole file
    except OSError as exc:  # a file object's error names no file (a full disk's one line names it, cli.py)
        raise OSError(exc.errno, exc.strerror, exc.filename or str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return total


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
