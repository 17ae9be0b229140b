"""Tokenizers: text -> integer ids, each with a stable fingerprint for the token cache key.

Two kinds, chosen by `DataConfig.tokenizer`:

* ``"byte"``: `ByteTokenizer`, UTF-8 bytes, vocab_size 256 (works with the default model
  vocab of 256, needs no file). Byte 0 (NUL) doubles as end-of-document: the corpus reader
  skips files containing NUL, so in text it never occurs and the marker is unambiguous.
* a path to a Hugging Face ``tokenizer.json`` (or a folder holding one): `HFTokenizer`, via the
  `tokenizers` library. `train_bpe_tokenizer` makes such a file from the configured corpus.

Streams for the token cache are built by `encode_documents`: every document followed by the
end-of-document id (as GPT-2 does with ``<|endoftext|>``), so the model sees where texts end.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from picotron_jax.config import DataConfig
from picotron_jax.data.corpus import Corpus
from picotron_jax.errors import UserError

BYTE = "byte"
ENDOFTEXT = "<|endoftext|>"
# End-of-document tokens of common tokenizer families, tried in order (GPT-2, Llama 3, Llama 2/T5, Gemma).
_EOS_CANDIDATES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
_DOCS_PER_BATCH = 512
_BYTES_PER_CHUNK = 16 << 20


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None  # appended after every document; None -> documents are concatenated
    fingerprint: str  # changes whenever the ids of any text could change

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def encode_documents(self, docs: Iterable[str]) -> Iterator[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 0 (NUL) ends each document."""

    vocab_size = 256
    eos_id = 0
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; the end-of-document byte comes back as '\\x00'."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_documents(self, docs: Iterable[str]) -> Iterator[np.ndarray]:
        """uint8 chunks of ~16 MB: joined bytes turned into ids with one np.frombuffer (no Python loop per byte)."""
        parts: list[bytes] = []
        size = 0
        for doc in docs:
            raw = doc.encode("utf-8")
            parts += (raw, b"\0")
            size += len(raw) + 1
            if size >= _BYTES_PER_CHUNK:
                yield np.frombuffer(b"".join(parts), dtype=np.uint8)
                parts, size = [], 0
        if parts:
            yield np.frombuffer(b"".join(parts), dtype=np.uint8)


class HFTokenizer:
    """A Hugging Face `tokenizer.json`; raw text is encoded without the model's BOS/EOS templates."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HFTokenizer  # lazily: byte-level runs never import it

        self.path = Path(path)
        raw = self.path.read_bytes()
        try:
            self._tok = _HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception for malformed files
            raise UserError(
                f"data.tokenizer = '{path}' is not a valid Hugging Face tokenizer.json ({exc}); "
                f"use 'byte' or a tokenizer.json file"
            ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = (self._tok.token_to_id(t) for t in _EOS_CANDIDATES)
        self.eos_id = next((i for i in ids if i is not None), None)
        self.fingerprint = "hf-" + hashlib.sha256(raw).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_documents(self, docs: Iterable[str]) -> Iterator[np.ndarray]:
        """int64 chunks; batches of documents go through the Rust encoder in parallel (encode_batch)."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast skips offsets
        batch: list[str] = []

        def flush() -> np.ndarray:
            pieces = []
            for enc in encode(batch, add_special_tokens=False):
                pieces.append(np.asarray(enc.ids, dtype=np.int64))
                if self.eos_id is not None:
                    pieces.append(np.array([self.eos_id], dtype=np.int64))
            return np.concatenate(pieces)

        for doc in docs:
            batch.append(doc)
            if len(batch) == _DOCS_PER_BATCH:
                yield flush()
                batch = []
        if batch:
            yield flush()


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"byte"` -> ByteTokenizer; a tokenizer.json (or a folder containing one) -> HFTokenizer."""
    if spec == BYTE:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not spec or not path.is_file():
        raise UserError(
            f"data.tokenizer = {spec!r}: no such file; use 'byte' or the path of a Hugging Face tokenizer.json "
            f"(train_bpe_tokenizer can make one from your corpus)"
        )
    return HFTokenizer(path)


def train_bpe_tokenizer(
    data_cfg: DataConfig, vocab_size: int, out_path: str | Path, max_bytes: int = 8_000_000
) -> Path:
    """Train a GPT-2-style byte-level BPE tokenizer.json on the configured corpus.

    Byte-level BPE (Radford et al. 2019): the 256 byte symbols are always in the vocabulary, so
    any text encodes without unknown tokens; `<|endoftext|>` (id 0) ends documents. Trains on
    the first `max_bytes` of UTF-8 text in corpus order (whole documents; deterministic): merges
    learnt from ~8 MB are close to those from much more and take seconds on 2 cores, not minutes.
    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_vocab = 256 + 1
    if vocab_size < min_vocab:
        raise UserError(
            f"BPE vocab_size = {vocab_size}: must be at least {min_vocab} (256 byte symbols + {ENDOFTEXT})"
        )
    if max_bytes <= 0:
        raise UserError(f"BPE max_bytes = {max_bytes}: must be positive")

    def subset() -> Iterator[str]:
        seen = 0
        for doc in Corpus.from_config(data_cfg).documents():
            yield doc
            seen += len(doc.encode("utf-8"))
            if seen >= max_bytes:
                return

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(subset(), trainer=trainer)

    out = Path(out_path).expanduser()
    if out.is_dir():
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tok.save(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
