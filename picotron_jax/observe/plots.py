"""PNG plots of a run from its own files (metrics.jsonl, alerts.jsonl): `picotron-jax plot RUN_DIR`, and at
the end of a run with `monitor.plots=true` (RUN_DIR/plots/).

One figure per question, each with the anomalies of alerts.jsonl as red vertical lines at their steps:

* `loss.png`: training loss (and evaluation loss when the run evaluated);
* `grad_norm.png`: gradient norm (log scale) and the update/parameter norm ratio when logged;
* `throughput.png`: tokens/s and MFU;
* `memory.png`: device memory (bytes in use on the first device; the process's RSS on CPU);
* `time.png`: the step-time split of every row (observe/step_time.py), stacked, and the goodput;
* `layers.png` (per-layer rows only): the per-layer gradient norm as a heat map (layers x steps).

Matplotlib's Agg backend: no display needed; reads only the run directory, so it works during a run,
after it, and on a copied directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from picotron_jax.callback import Callback
from picotron_jax.errors import UserError
from picotron_jax.observe.step_time import ROW_CLASSES


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a JSON-lines file ([] if it is missing); a line cut short by a kill is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
             and math.isfinite(r[key])]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of `run_dir` into `out_dir` (default RUN_DIR/plots); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_rows(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        raise UserError(f"plot: no training rows in {run_dir / 'metrics.jsonl'}; give the run directory of a run "
                        f"that logged at least one step")
    evals = [r for r in rows if r.get("kind") == "eval"]
    alerts = read_rows(run_dir / "alerts.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def figure(name: str, title: str, draw, marks: bool = True) -> None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        draw(ax)
        for a in alerts if marks else ():
            ax.axvline(a["step"], color="red", alpha=0.5, linewidth=1)
        if alerts and marks:
            ax.plot([], [], color="red", alpha=0.5, label=f"anomalies ({len(alerts)})")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    def loss(ax):
        ax.plot(*_series(train, "loss"), label="train loss")
        if evals:
            ax.plot(*_series(evals, "eval_loss"), "o-", label="eval loss")
        ax.set_ylabel("loss (nats/token)")

    def grad(ax):
        ax.plot(*_series(train, "grad_norm"), label="grad norm")
        ax.set_yscale("log")
        if any("update_ratio" in r for r in train):
            ax.plot(*_series(train, "update_ratio"), label="update / param norm")

    def throughput(ax):
        ax.plot(*_series(train, "tokens_per_s"), label="tokens/s")
        ax.set_ylabel("tokens/s")
        steps, mfu = _series(train, "mfu")
        if mfu:
            twin = ax.twinx()
            twin.plot(steps, [100 * m for m in mfu], color="tab:green", label="MFU %")
            twin.set_ylabel("MFU %")

    def memory(ax):
        steps, used = _series(train, "memory_bytes")
        ax.plot(steps, [b / 2**30 for b in used], label="memory in use")
        ax.set_ylabel("GiB")

    def split(ax):
        timed = [r for r in train if "time_device_s" in r]
        steps = [r["step"] for r in timed]
        ax.stackplot(range(len(timed)), *[[r[f"time_{k}_s"] for r in timed] for k in ROW_CLASSES], labels=ROW_CLASSES)
        ax.set_xticks(range(len(timed))[:: max(1, len(timed) // 10)], [str(s) for s in steps][:: max(1, len(timed) // 10)])
        ax.set_ylabel("seconds per logged row")
        ax.set_yscale("symlog", linthresh=1e-3)
        if timed:
            ax.set_title(f"goodput {100 * timed[-1]['goodput']:.1f}%", loc="right", fontsize=9)

    figure("loss.png", "loss", loss)
    figure("grad_norm.png", "gradient norm", grad)
    figure("throughput.png", "throughput", throughput)
    figure("memory.png", "memory", memory)
    if any("time_device_s" in r for r in train):
        figure("time.png", "step-time split (observe/step_time.py)", split, marks=False)  # x: rows, not steps
    layered = [r for r in train if "layer_grad_norm" in r]
    if layered:
        import numpy as np

        fig, ax = plt.subplots(figsize=(8, 4.5))
        grid_LS = np.log10(np.maximum(np.asarray([r["layer_grad_norm"] for r in layered], dtype=float).T, 1e-12))
        image = ax.imshow(grid_LS, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(layered))[:: max(1, len(layered) // 10)],
                      [str(r["step"]) for r in layered][:: max(1, len(layered) // 10)])
        ax.set_xlabel("step")
        ax.set_ylabel("decoder layer")
        ax.set_title("log10 per-layer gradient norm")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out / "layers.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


class PlotsAtEnd(Callback):
    """`monitor.plots`: RUN_DIR/plots/*.png at the end of each run() (main process)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_run_end(self, trainer, summary):
        if (self.run_dir / "metrics.jsonl").is_file():
            files = plot_run(self.run_dir)
            trainer.say(f"plots: {len(files)} PNGs in {self.run_dir / 'plots'}")


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="PNG plots of a run directory (loss, grad norm, throughput, memory, time split)")
    p.add_argument("run_dir", help="the run directory (its metrics.jsonl and alerts.jsonl)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")


def cmd_plot(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"plot: {run_dir} is not a directory; give a run directory (picotron-jax train --run-dir)")
    for path in plot_run(run_dir, args.out):
        print(path)
    return 0
