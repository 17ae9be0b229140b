"""k-shot adaptation curves of `picotron-jax meta` (meta-learned vs conventionally pre-trained initialisation),
as the command's table, a JSON and (with --plot, needs matplotlib) a PNG.

    PYTHONPATH=$PWD python benchmarks/meta_adaptation.py --config meshes/maml-sine.yaml \
        --out benchmarks/results/maml-sine.json --plot benchmarks/results/maml-sine.png [overrides]
    PYTHONPATH=$PWD python benchmarks/meta_adaptation.py --config meshes/maml-corpus.yaml \
        --out benchmarks/results/maml-corpus.json --plot benchmarks/figures/maml_corpus.png
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # the mesh presets need 4-8 devices
import json
from pathlib import Path

import picotron_jax as pj
from picotron_jax.meta.loop import run_meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="meshes/maml-sine.yaml")
    ap.add_argument("--out", default="benchmarks/results/maml-sine.json")
    ap.add_argument("--plot", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = pj.load_config(args.config, args.overrides)
    result = run_meta(cfg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        steps = range(len(result["meta"]))
        ax.plot(steps, result["meta"], marker="o", label=f"meta-learned ({cfg.meta.algorithm})")
        ax.plot(steps, result["baseline"], marker="o", label="pre-trained (same gradient evaluations)")
        corpus = cfg.meta.task == "corpus"
        support = f"{cfg.meta.k_support} sequences of the file" if corpus else f"{cfg.meta.k_support} points"
        ax.set_xlabel(f"inner SGD steps (lr {cfg.meta.inner_lr}) on {support}")
        ax.set_ylabel("held-out query next-token loss (nats)" if corpus else "held-out query MSE")
        ax.set_title(f"{cfg.meta.task}: {cfg.meta.eval_tasks} held-out tasks")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
