"""The layout tuner against an exhaustive measured sweep (issue 21's "what must be shown" 1).

Runs `picotron-jax tune layout` with every valid candidate measured (--top = all), then asks what the
tuner would have chosen had it measured only the best-predicted 20%: is that within 5% of the sweep's
best measured tokens/s? Also the Spearman rank correlation of predicted vs measured step time.
Step times are a few steps each on whatever machine this runs on (on the shared 2-core VM: noisy).

    python benchmarks/tune_layout.py --config meshes/bench-32m.yaml --devices 8 --json out.json \
        [-- tune-layout options, e.g. --axes pipe,data,tensor --zero 0 --accum 1,4]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from picotron_jax.tune.layout import spearman


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="meshes/bench-32m.yaml")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--share", type=float, default=0.2, help="share of the candidates the tuner may measure")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "picotron_jax.cli", "tune", "layout", "--config", args.config,
                        "--devices", str(args.devices), "--top", "100000", "--cache-dir", "none",
                        "--json", str(out), *rest], check=True)
        rep = json.loads(out.read_text())
    cands = [c for c in rep["candidates"] if c["measured_step_s"] is not None]  # predicted order
    best = max(cands, key=lambda c: c["measured_tokens_per_s"])
    k = max(1, math.ceil(args.share * len(cands)))
    pick = max(cands[:k], key=lambda c: c["measured_tokens_per_s"])
    rho = spearman([c["predicted_step_s"] for c in cands], [c["measured_step_s"] for c in cands])
    summary = {"config": args.config, "devices": args.devices, "measured": len(cands), "tuner_measures": k,
               "sweep_best": best["label"], "sweep_best_tokens_per_s": best["measured_tokens_per_s"],
               "tuner_choice": pick["label"], "tuner_tokens_per_s": pick["measured_tokens_per_s"],
               "tuner_vs_best": pick["measured_tokens_per_s"] / best["measured_tokens_per_s"],
               "spearman": rho, "failed": [c["label"] for c in rep["candidates"] if c["error"]]}
    print("| rank (predicted) | layout | peak MiB | predicted ms | measured ms | tokens/s |")
    print("|---|---|---|---|---|---|")
    for i, c in enumerate(cands):
        print(f"| {i + 1} | {c['label']} | {c['peak_bytes'] / 2**20:.1f} | {c['predicted_step_s'] * 1e3:.1f} | "
              f"{c['measured_step_s'] * 1e3:.1f} | {c['measured_tokens_per_s']:,.0f} |")
    print(json.dumps(summary, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "report": rep}, indent=2) + "\n")


if __name__ == "__main__":
    main()
