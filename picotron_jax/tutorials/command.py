"""`picotron-jax learn`: run a lesson's checks from a terminal, or write blank copies of the notebooks.

    picotron-jax learn list                       # the lessons
    picotron-jax learn check 04 [--notebook my.ipynb]   # execute the lesson (yours or the stored one), print its checks
    picotron-jax learn reset [--out notebooks/learner]  # copies with the answer cells blanked
"""

from __future__ import annotations

from pathlib import Path

from picotron_jax.errors import UserError

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def lessons() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))


def lesson_path(name: str) -> Path:
    found = [p for p in lessons() if p.stem == name or p.stem.split("_")[0] == name.zfill(2)]
    if not found:
        raise UserError(f"learn check: no lesson {name!r}; lessons: {', '.join(p.stem for p in lessons())}")
    return found[0]


def add_parser(sub) -> None:
    p = sub.add_parser("learn", help="the tutorial notebooks: list them, run a lesson's checks, blank the answers")
    p.add_argument("action", choices=("list", "check", "reset"))
    p.add_argument("lesson", nargs="?", help="check: the lesson number or name, e.g. 04 or 04_pipeline_schedules")
    p.add_argument("--notebook", help="check: your own copy of the lesson's notebook (default: the stored one)")
    p.add_argument("--out", default="notebooks/learner", help="reset: the folder for the blank copies")
    p.add_argument("--timeout", type=int, default=900, help="check: seconds a cell may run")


def check(path: Path, timeout: int) -> list[tuple[str, bool, str]]:
    """Execute a notebook top to bottom; (check cell source, passed, its output) for every check cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS.parent)}}).execute()
    except CellExecutionError:
        pass  # the failing cell's error is in its outputs
    results = []
    for cell in nb.cells:
        if cell.cell_type != "code" or ".check_" not in cell.source:
            continue
        text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)
        errors = [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]
        results.append((cell.source.strip(), "passed" in text and not errors, "\n".join(errors) or text.strip()
                        or "(not run: an earlier cell failed)"))
    return results


def cmd_learn(args) -> int:
    if args.action == "list":
        for p in lessons():
            print(p.stem)
        return 0
    if args.action == "reset":
        from picotron_jax.tutorials.notebook import main

        main(["reset", *map(str, lessons()), "--out", args.out])
        return 0
    if not args.lesson:
        raise UserError("learn check: give a lesson, e.g. picotron-jax learn check 04")
    path = Path(args.notebook) if args.notebook else lesson_path(args.lesson)
    results = check(path, args.timeout)
    for source, ok, text in results:
        print(("PASS " if ok else "FAIL ") + source.splitlines()[-1])
        print("     " + text.replace("\n", "\n     "))
    return 0 if results and all(ok for _, ok, _ in results) else 1
