"""Sequence-length warm-up vs the baseline: eval loss against training tokens, same seed and step budget.

Runs the default model (meshes/single.yaml: the default preset's model on one device, the standard
library corpus) three times: no curriculum, warm-up with constant tokens per step, warm-up truncating
rows (DeepSpeed's setting: fewer tokens per early step). Prints and writes a JSON of the eval curves,
each run's final eval loss, and the training tokens each run needed to reach the baseline's final eval
loss; with --plot, a PNG of the curves (needs matplotlib: pip install 'picotron-jax[plots]').

    PYTHONPATH=$PWD python benchmarks/curriculum_warmup.py --steps 300 --out benchmarks/results/curriculum.json \
        --plot benchmarks/results/curriculum.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import picotron_jax as pj


def run(name: str, steps: int, overrides: list[str]) -> dict:
    cfg = pj.load_config("single", [f"train.steps={steps}", "eval.tokens=16384", f"eval.every={steps // 12}",
                                    "logging.progress=false", "logging.every=1", *overrides])
    with pj.Trainer(cfg) as trainer:
        summary = trainer.run()
    seen, curve = 0, []
    for row in summary.rows:  # every step is logged (logging.every=1): its row counts its tokens
        if row["kind"] == "train":
            seen += row["tokens"]
        else:
            curve.append({"step": row["step"], "tokens": seen, "eval_loss": row["eval_loss"]})
    return {"name": name, "overrides": overrides, "curve": curve, "final_eval_loss": curve[-1]["eval_loss"],
            "wall_s": summary.wall_s}


def tokens_to_reach(curve: list[dict], target: float) -> int | None:
    for point in curve:
        if point["eval_loss"] <= target:
            return point["tokens"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/curriculum.json")
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    warm = [f"curriculum.steps={args.steps // 2}", "curriculum.kind=seqlen", "curriculum.start_seq_len=16"]
    runs = [run("baseline", args.steps, []),
            run("warmup, constant tokens", args.steps, [*warm, "curriculum.seq_len_step=8"]),
            run("warmup, truncated rows", args.steps, [*warm, "curriculum.seq_len_step=16",
                                                      "curriculum.constant_tokens=false"])]
    target = runs[0]["final_eval_loss"]
    for r in runs:
        r["tokens_to_baseline_final"] = tokens_to_reach(r["curve"], target)
        print(f"{r['name']:<26} final eval loss {r['final_eval_loss']:.4f} | tokens to reach the baseline's final "
              f"{target:.4f}: {r['tokens_to_baseline_final']} | total tokens {r['curve'][-1]['tokens']:,} | "
              f"{r['wall_s']:.0f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(runs, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            ax.plot([p["tokens"] for p in r["curve"]], [p["eval_loss"] for p in r["curve"]], marker="o", label=r["name"])
        ax.axhline(target, color="grey", linestyle=":", label="baseline final")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("eval loss (full length)")
        ax.set_title(f"sequence-length warm-up, default model, {args.steps} steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
