"""Data: text sources -> token cache -> deterministic, random-access batches placed on the mesh.

Batch i is a pure function of (seed, corpus, tokenizer, i) (DESIGN.md, "Determinism and resume"):
`TokenDataset.batch_rows(i, B, rows)` reads it directly, and `global_batch` has every process read
only the rows its devices hold.
"""

from picotron_jax.data.corpus import STDLIB, Corpus
from picotron_jax.data.dataset import DEFAULT_CACHE_DIR, TokenDataset, token_dtype
from picotron_jax.data.loader import (
    addressable_indices,
    eval_batch,
    global_batch,
    prefetch,
    process_rows,
    rows_by_process,
)
from picotron_jax.data.tokenizer import (
    ENDOFTEXT,
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "STDLIB",
    "Corpus",
    "DEFAULT_CACHE_DIR",
    "TokenDataset",
    "token_dtype",
    "addressable_indices",
    "eval_batch",
    "global_batch",
    "prefetch",
    "process_rows",
    "rows_by_process",
    "ENDOFTEXT",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
]
