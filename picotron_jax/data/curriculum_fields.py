"""Difficulty given by the user (`curriculum.metric=field`): each .jsonl/.parquet record carries a number in
`curriculum.score_field`, the difficulty of its document (higher: harder), e.g. a grade level, a quality
classifier's score or a reference model's loss computed elsewhere (the "external" difficulty of DeepSpeed's
data efficiency library, Li et al. arXiv 2212.03597, which reads precomputed per-sample metrics).

The token file keeps no document boundaries (documents are concatenated, each closed by the tokenizer's
end-of-document token, dataset.py), so they are recovered once: the corpus is read again in the same order
(corpus.py: same files, same skipped empty documents) and each document is tokenised alone with the same
`encode_documents`, which gives its token count n_d; the counts must add up to the token file's length.
A training window covers tokens [w T, w T + T + 1) and may span several documents; its score is the
token-weighted mean of their scores:

    score(w) = (S(wT + T + 1) - S(wT)) / (T + 1),   S(x) = sum of the document scores of tokens [0, x)

so a window inside one document gets that document's score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from picotron_jax.config import DataConfig
from picotron_jax.errors import UserError

FIELD = "curriculum.score_field"


def _number(value: object, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: field {field!r} holds {value!r}, but config field '{FIELD}' = {field!r} needs a "
                        f"finite number in every record (the document's difficulty)")
    return float(value)


def _jsonl_records(path: Path, text_field: str, field: str) -> Iterator[tuple[str, float | None]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)  # the corpus has been read whole once: its errors were reported then
            text = record.get(text_field) or ""
            if not text:
                yield "", None
                continue
            if field not in record:
                raise UserError(f"config field '{FIELD}' = {field!r}: not found in {path} line {lineno}; fields "
                                f"there: {', '.join(map(str, record))}")
            yield text, _number(record[field], field, f"{path} line {lineno}")


def _parquet_records(path: Path, text_field: str, field: str) -> Iterator[tuple[str, float | None]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise UserError(f"config field '{FIELD}' = {field!r}: no such column in {path}; columns there: "
                        f"{', '.join(pf.schema_arrow.names)}")
    row = 0
    for batch in pf.iter_batches(columns=[text_field, field], batch_size=1024):
        for text, value in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            row += 1
            yield (text, _number(value, field, f"{path} row {row}")) if text else ("", None)


def document_scores(data_cfg: DataConfig, field: str) -> Iterator[tuple[str, float]]:
    """(text, score) of every non-empty document, in the corpus's order (corpus.py)."""
    from picotron_jax.data.corpus import Corpus
    from picotron_jax.data.store import is_store

    if data_cfg.mixture or is_store(data_cfg.source):
        raise UserError(f"config field '{FIELD}' = {field!r}: scores are read from the records of data.source, so it "
                        f"must be a .jsonl/.parquet file or a folder of them (not a mixture or a token store)")
    corpus = Corpus.from_config(data_cfg)
    for path in corpus.files:
        if path.suffix == ".jsonl":
            records = _jsonl_records(path, data_cfg.text_field, field)
        elif path.suffix == ".parquet":
            records = _parquet_records(path, data_cfg.text_field, field)
        else:
            raise UserError(f"config field '{FIELD}' = {field!r}: {path} is a plain text document without fields; "
                            f"curriculum.metric=field needs data.source of .jsonl/.parquet records only")
        yield from ((text, score) for text, score in records if text)


def field_scores(ds: Any, data_cfg: DataConfig, field: str) -> np.ndarray:
    """Token-weighted mean document score of each training window of `ds`, float64 [num_sequences]."""
    from picotron_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_cfg.tokenizer)
    lengths, scores = [], []
    for text, score in document_scores(data_cfg, field):
        lengths.append(sum(chunk.size for chunk in tokenizer.encode_documents([text])))
        scores.append(score)
    lengths_D, scores_D = np.asarray(lengths, np.int64), np.asarray(scores, np.float64)
    if int(lengths_D.sum()) != ds.num_tokens:
        raise UserError(f"config field '{FIELD}' = {field!r}: the documents of data.source hold {int(lengths_D.sum())} "
                        f"tokens but the token file {ds.path} has {ds.num_tokens}; the corpus changed since it was "
                        f"tokenised: touch a file of data.source to tokenise it again")
    return window_means(ds, lengths_D, scores_D)


def length_scores(ds: Any, eos_id: int, chunk: int = 1 << 22) -> np.ndarray:
    """`curriculum.metric=length`: the token-weighted mean length (tokens, its end-of-document token included)
    of the documents each training window spans, float64 [num_sequences]. The documents are read off the token
    file itself: each ends with the tokenizer's end-of-document id `eos_id` (dataset.py), the last one possibly
    cut off by the held-out tail."""
    ends = [np.flatnonzero(ds.take(np.arange(lo, min(lo + chunk, ds.num_tokens))) == eos_id) + lo
            for lo in range(0, ds.num_tokens, chunk)]
    ends_D = np.concatenate([*ends, np.asarray([], np.int64)]) + 1  # one past each document's last token
    if not ends_D.size or ends_D[-1] != ds.num_tokens:
        ends_D = np.append(ends_D, ds.num_tokens)
    lengths_D = np.diff(np.concatenate([[0], ends_D])).astype(np.int64)
    return window_means(ds, lengths_D, lengths_D.astype(np.float64))


def window_means(ds: Any, lengths_D: np.ndarray, scores_D: np.ndarray) -> np.ndarray:
    """The token-weighted mean of the scores of the documents (token counts `lengths_D`, in the token file's
    order) that each training window of `ds` spans (the module docstring's formula), float64 [num_sequences]."""
    starts_D = np.concatenate([[0], np.cumsum(lengths_D)[:-1]])
    mass_D = np.concatenate([[0.0], np.cumsum(lengths_D * scores_D)[:-1]])  # S at each document's start

    def prefix(x: np.ndarray) -> np.ndarray:  # S(x): score mass of tokens [0, x)
        d = np.searchsorted(starts_D, x, side="right") - 1
        return mass_D[d] + (x - starts_D[d]) * scores_D[d]

    lo = np.arange(ds.num_sequences, dtype=np.int64) * ds.seq_len
    return (prefix(lo + ds.seq_len + 1) - prefix(lo)) / (ds.seq_len + 1)
