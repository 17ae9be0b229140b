"""Text sources -> one fixed, deterministic sequence of documents (strings).

Determinism starts here: batch i can only be a pure function of (seed, data, i) if the data
itself always comes out in the same order, so every listing is sorted by relative path and
every source is read the same way on every run and host.

Sources (`DataConfig.source`):

* ``"stdlib"``: the running Python's own standard library `.py` files, the corpus that needs no
  download. `site-packages`, test suites (`test/`, `tests/`, `idlelib/idle_test`), hidden and
  non-UTF-8 files are left out; each file is one document. (CPython 3.11: 734 files, ~12 MB.)
* a text file: the whole file is one document (it is read whole: split huge corpora into a
  folder or a .jsonl).
* a folder: every file below it, recursively, sorted by relative path; hidden files/folders
  (`.git`) are skipped, `.jsonl`/`.parquet` files are read as records, any other file is one
  document if it is UTF-8 text without NUL bytes (binaries are skipped).
* ``.jsonl``: one JSON object per line, text in `text_field`; each line is one document.
* ``.parquet``: column `text_field`; each row is one document (read with pyarrow, in batches).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from picotron_jax.config import DataConfig
from picotron_jax.errors import UserError

STDLIB = "stdlib"
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_RECORD_SUFFIXES = (".jsonl", ".parquet")
_SOURCE_HELP = (
    "use 'stdlib' (the built-in corpus), a text file, a folder of text files, a .jsonl or a .parquet file"
)


@dataclass(frozen=True)
class Corpus:
    """A listed data source: which files, in which order, and how to read them."""

    source: str  # as configured, for messages
    kind: str  # "stdlib" | "file" | "folder"
    root: Path  # fingerprints use paths relative to it, so moving the whole tree keeps the key
    files: tuple[Path, ...]  # sorted by relative POSIX path
    text_field: str

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> Corpus:
        source = data_cfg.source
        if source == STDLIB:
            root = Path(sysconfig.get_paths()["stdlib"])
            return cls(source, "stdlib", root, tuple(_list_stdlib(root)), data_cfg.text_field)
        path = Path(source).expanduser()
        if not source or not path.exists():
            raise UserError(f"data.source = {source!r}: no such file or folder; {_SOURCE_HELP}")
        if path.is_dir():
            return cls(source, "folder", path, tuple(_list_folder(path)), data_cfg.text_field)
        return cls(source, "file", path.parent, (path,), data_cfg.text_field)

    def fingerprint(self) -> str:
        """sha256 over (kind, relative path, size, mtime_ns) of every file: the token-cache key.

        Stat-based, not content-based, so a cached run starts without reading the corpus
        (stdlib: ~10 ms for stat vs ~125 ms for hashing 12 MB; hashing costs ~10 s per GB).
        Any edit changes mtime (and usually size); `touch` a file to force re-tokenisation.
        """
        h = hashlib.sha256(f"corpus-v1\n{self.kind}\n".encode())
        if any(p.suffix in _RECORD_SUFFIXES for p in self.files):
            h.update(f"text_field={self.text_field}\n".encode())
        for p in self.files:
            st = p.stat()
            h.update(f"{self._rel(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def documents(self) -> Iterator[str]:
        """Yield the non-empty documents in order; raise UserError at the end if there were none."""
        n_docs, n_skipped = 0, 0
        for path in self.files:
            if path.suffix == ".jsonl":
                docs = _jsonl_documents(path, self.text_field)
            elif path.suffix == ".parquet":
                docs = _parquet_documents(path, self.text_field)
            else:
                text = _read_text(path)
                if text is None:
                    if self.kind == "file":
                        raise UserError(
                            f"data.source = {self.source!r} is not UTF-8 text (binary or another encoding); "
                            f"convert it to UTF-8 or {_SOURCE_HELP}"
                        )
                    n_skipped += 1
                    continue
                docs = iter((text,))
            for doc in docs:
                if doc:
                    n_docs += 1
                    yield doc
        if n_docs == 0:
            skipped = f" ({n_skipped} binary or non-UTF-8 files were skipped)" if n_skipped else ""
            raise UserError(
                f"data.source = {self.source!r} contains no text{skipped}; point it at non-empty UTF-8 text "
                f"or use data.source=stdlib"
            )

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


# ------------------------------------------------------------------------------------ listing


def _list_stdlib(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _list_folder(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


# ------------------------------------------------------------------------------------ reading


def _read_text(path: Path) -> str | None:
    """The file's text, or None for binaries (NUL bytes), non-UTF-8 and unreadable files."""
    try:
        raw = path.read_bytes()
        if b"\0" in raw:
            return None
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{path} line {lineno} is not valid JSON ({exc.msg}); each line must be one JSON "
                        f'object like {{"{field}": "..."}}'
                    ) from None
                if not isinstance(record, dict):
                    raise UserError(
                        f"{path} line {lineno} is a JSON {type(record).__name__}, not an object; each line "
                        f'must look like {{"{field}": "..."}}'
                    )
                if field not in record:
                    raise UserError(
                        f"field {field!r} not found in {path} line {lineno}; fields there: "
                        f"{', '.join(map(str, record)) or '(none)'}. Set data.text_field to the field that holds "
                        f"the text"
                    )
                yield _check_text(record[field], field, f"{path} line {lineno}")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; .jsonl files must be UTF-8") from None


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # lazily: only parquet users pay the import

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path} is not a readable parquet file ({exc}); re-export it or use .jsonl") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(
            f"column {field!r} not found in {path}; columns there: {', '.join(names) or '(none)'}. "
            f"Set data.text_field to the column that holds the text"
        )
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _check_text(value, field, f"{path} row {row}")


def _check_text(value: object, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} holds a {type(value).__name__}, expected a string of text")
    return value
