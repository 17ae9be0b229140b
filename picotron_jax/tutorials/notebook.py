"""Notebooks from their percent-format sources (`notebooks/src/*.py`), and blank copies for a learner.

A source is Python with cell markers: `# %% [markdown]` (the lines below, without their leading `# `,
are Markdown), `# %%` (code), `# %% answer` (code holding an exercise's reference answer, tagged `answer`)
and `# %% blank` (what the learner sees instead of the answer cell just above; stored in its metadata).
The stored notebooks carry the answers, so they run in CI; `reset` writes copies with every answer cell
replaced by its blank.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat

MARKER = re.compile(r"^# %%(?: (\[markdown\]|answer|blank))?\s*$")
KERNEL = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"}}


def _cells(text: str) -> list[tuple[str, str]]:
    cells, kind, lines = [], None, []
    for line in text.splitlines():
        m = MARKER.match(line)
        if m:
            if kind is not None:
                cells.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = m.group(1) or "code", []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        cells.append((kind, "\n".join(lines).strip("\n")))
    return cells


def build(source: str | Path) -> nbformat.NotebookNode:
    """The notebook of one percent-format source file (no outputs)."""
    nb = nbformat.v4.new_notebook(metadata=dict(KERNEL))
    for kind, body in _cells(Path(source).read_text()):
        if kind == "[markdown]":
            nb.cells.append(nbformat.v4.new_markdown_cell(
                "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())))
        elif kind == "blank":
            if not nb.cells or "answer" not in nb.cells[-1].metadata.get("tags", []):
                raise ValueError(f"{source}: a '# %% blank' cell must follow a '# %% answer' cell")
            nb.cells[-1].metadata["blank"] = body
        else:
            cell = nbformat.v4.new_code_cell(body)
            if kind == "answer":
                cell.metadata["tags"] = ["answer"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding an unchanged source gives the same file
        cell["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    return nb


def blank(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy with each answer cell's source replaced by its blank and every output cleared."""
    out = nbformat.from_dict(nb)
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if "answer" in cell.metadata.get("tags", []):
                cell.source = cell.metadata.get("blank", "# your answer here")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m picotron_jax.tutorials",
                                 description="Build the tutorial notebooks, or write blank copies for a learner.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="notebooks/src/*.py -> notebooks/*.ipynb (answers filled in, no outputs)")
    b.add_argument("--src", default="notebooks/src")
    b.add_argument("--out", default="notebooks")
    r = sub.add_parser("reset", help="copies of the notebooks with the answer cells blanked")
    r.add_argument("notebooks", nargs="*", default=None, help="default: notebooks/[0-9]*.ipynb")
    r.add_argument("--out", default="notebooks/learner")
    args = ap.parse_args(argv)
    if args.command == "build":
        for src in sorted(Path(args.src).glob("[0-9]*.py")):
            target = Path(args.out) / (src.stem + ".ipynb")
            nbformat.write(build(src), target)
            print("wrote", target)
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in [Path(p) for p in args.notebooks] or sorted(Path("notebooks").glob("[0-9]*.ipynb")):
            nb = blank(nbformat.read(path, as_version=4))
            nbformat.write(nb, out / path.name)
            n = sum("answer" in c.metadata.get("tags", []) for c in nb.cells)
            print(f"wrote {out / path.name} ({n} answer cell(s) blanked)")
