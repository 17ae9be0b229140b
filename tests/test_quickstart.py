"""The quickstart script and notebook (the README's Python API example) run top to bottom."""

from __future__ import annotations

import runpy

import pytest

from helpers import ROOT


def test_quickstart_script_trains_inspects_evaluates_generates_and_trains_on(capsys):
    main = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))["main"]
    summary = main(["train.steps=24", "train.seq_len=32", "eval.tokens=1024", "logging.progress=false"])
    out = capsys.readouterr().out
    assert summary.steps == 24 and summary.eval_loss < 5.0  # learned something: ln 256 = 5.55 at the start
    assert "layers.wq" in out and "eval: {'kind': 'eval'" in out and "sample: '" in out


@pytest.mark.notebooks
def test_quickstart_notebook_runs_from_a_fresh_kernel():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "00_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    texts = [o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells
             if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("8 devices" in t for t in texts) and any("'kind': 'eval'" in t for t in texts)
