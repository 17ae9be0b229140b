"""The tutorial notebooks: stored as built from notebooks/src (no outputs), blankable for a learner, and
(marker `notebooks`, `make test-notebooks`) executed top to bottom with every check passing and every
figure rendered."""

from __future__ import annotations

import pytest

from helpers import ROOT

nbformat = pytest.importorskip("nbformat")
from picotron_jax.tutorials.notebook import blank, build  # noqa: E402

SOURCES = sorted((ROOT / "notebooks" / "src").glob("[0-9]*.py"))
NAMES = [s.stem for s in SOURCES]


def test_stored_notebooks_are_their_sources_built_without_outputs():
    assert len(NAMES) >= 1
    for src in SOURCES:
        stored = nbformat.read(ROOT / "notebooks" / f"{src.stem}.ipynb", as_version=4)
        assert stored == build(src), f"notebooks/{src.stem}.ipynb is stale: run python -m picotron_jax.tutorials build"
        assert all(not c.get("outputs") for c in stored.cells if c.cell_type == "code")
        answers = [c for c in stored.cells if "answer" in c.metadata.get("tags", [])]
        assert answers and all(c.metadata.get("blank") for c in answers), src.stem  # every lesson has an exercise


def test_reset_blanks_exactly_the_answer_cells():
    nb = build(SOURCES[0])
    out = blank(nb)
    for before, after in zip(nb.cells, out.cells):
        if "answer" in before.metadata.get("tags", []):
            assert after.source == before.metadata["blank"] != before.source
        else:
            assert after.source == before.source


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_its_checks_pass(name):
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    texts = [o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs]
    checks = [c for c in nb.cells if c.cell_type == "code" and ".check_" in c.source]
    assert checks and all(any("passed" in str(o.get("data", {}).get("text/plain", "")) + o.get("text", "")
                              for o in c.outputs) for c in checks), name
    figures = sum("plt.show()" in c.source for c in nb.cells if c.cell_type == "code")
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= figures >= 1, name
    assert texts


@pytest.mark.notebooks
def test_learn_check_names_the_failed_property_of_a_wrong_answer(tmp_path, capsys):
    from picotron_jax.cli import main

    nb = build(ROOT / "notebooks" / "src" / "01_mesh_and_shardings.py")
    for cell in nb.cells:
        if "answer" in cell.metadata.get("tags", []):
            cell.source = cell.source.replace('"layers.wq": (4, 32, 4, 16)', '"layers.wq": (4, 128, 4, 16)')
    nbformat.write(nb, tmp_path / "mine.ipynb")
    assert main(["learn", "check", "01", "--notebook", str(tmp_path / "mine.ipynb")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "per-device shape of layers.wq" in out and "(4, 32, 4, 16)" in out
    assert main(["learn", "check", "01"]) == 0 and "PASS" in capsys.readouterr().out


def test_learn_reset_writes_blank_copies(tmp_path, capsys):
    from picotron_jax.cli import main

    assert main(["learn", "reset", "--out", str(tmp_path)]) == 0
    for name in NAMES:
        nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
        answers = [c for c in nb.cells if "answer" in c.metadata.get("tags", [])]
        assert answers and all(c.source == c.metadata["blank"] for c in answers)
    assert "answer cell(s) blanked" in capsys.readouterr().out
