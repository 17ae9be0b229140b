"""The layout tuner against an exhaustive measured sweep (issue 21's "what must be shown" 1).

Runs `picotron-jax tune layout` with every valid candidate measured (--top = all), then replays what the
tuner would have chosen had it measured only 20% of them: K of those calibrate the model
(tune/calibrate.py, K = 0: the micro-benchmark rates alone), the rest are the best re-ranked. Is the
choice within 5% of the sweep's best measured tokens/s? Also the Spearman rank correlation of predicted
vs measured step time (wall, and the process's CPU seconds, which other users' load disturbs less).
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


def simulate(rep: dict, share: float, calibrate: int, cpu_terms: bool = True) -> dict:
    """What `tune layout --calibrate K --top M` would have chosen, K + M = the measured share, replayed on
    the sweep's measurements: K spread picks calibrate the model, the M best re-ranked are measured."""
    from picotron_jax.tune.calibrate import calibrated, fit_scales, spread_picks
    from picotron_jax.tune.cost import Hardware
    from picotron_jax.tune.layout import predict

    cands = [c for c in rep["candidates"] if c["measured_step_s"] is not None and c["fits"]]
    hw = Hardware(**rep["hardware"])
    if not cpu_terms:  # the model before the XLA:CPU terms: matmul FLOPs and per-axis links only
        hw = Hardware(**{**rep["hardware"], "write_bytes_per_s": 0.0, "thunk_s": 0.0, "copy_bytes_per_s": 0.0})
    hw0 = hw
    base = [predict(c["compiled"], hw) for c in cands]
    budget = max(1, math.ceil(share * len(cands)))
    k = min(calibrate, budget)
    picks = spread_picks(base, k) if k else []
    preds = base
    if picks:
        scales = fit_scales([base[i] for i in picks], [cands[i]["measured_step_s"] for i in picks])
        hw = calibrated(hw, scales)
        preds = [predict(c["compiled"], hw) for c in cands]
    order = sorted((i for i in range(len(cands)) if i not in picks), key=lambda i: preds[i]["step_s"])
    measured = picks + order[: budget - len(picks)]
    pick = max(measured, key=lambda i: cands[i]["measured_tokens_per_s"])
    best = max(range(len(cands)), key=lambda i: cands[i]["measured_tokens_per_s"])
    has_cpu = all(c.get("measured_cpu_s") for c in cands)
    cpu = {}
    if has_cpu:  # the same replay with --objective cpu: calibrated on, and choosing by, CPU seconds
        cpreds = base
        if picks:
            scales = fit_scales([base[i] for i in picks], [cands[i]["measured_cpu_s"] for i in picks])
            chw = calibrated(hw0, scales)
            cpreds = [predict(c["compiled"], chw) for c in cands]
        corder = sorted((i for i in range(len(cands)) if i not in picks), key=lambda i: cpreds[i]["step_s"])
        cpick = min(picks + corder[: budget - len(picks)], key=lambda i: cands[i]["measured_cpu_s"])
        cbest = min(range(len(cands)), key=lambda i: cands[i]["measured_cpu_s"])
        cpu = {"cpu_objective_choice": cands[cpick]["label"], "cpu_objective_best": cands[cbest]["label"],
               "cpu_objective_vs_best": cands[cbest]["measured_cpu_s"] / cands[cpick]["measured_cpu_s"]}
    held = [i for i in range(len(cands)) if i not in picks]
    rho = lambda idx, key: spearman([preds[i]["step_s"] for i in idx], [cands[i][key] for i in idx])  # noqa: E731
    return {"model": ("matmul+links" if not cpu_terms else "with CPU terms") + (f", calibrated on {k}" if k else ""),
            "calibrate": k, "tuner_measures": len(measured), "of": len(cands),
            "tuner_choice": cands[pick]["label"], "sweep_best": cands[best]["label"],
            "tuner_vs_best": cands[pick]["measured_tokens_per_s"] / cands[best]["measured_tokens_per_s"],
            "spearman_wall": rho(range(len(cands)), "measured_step_s"),
            "spearman_wall_held_out": rho(held, "measured_step_s") if k else None,
            "spearman_cpu": rho(range(len(cands)), "measured_cpu_s") if cands[0].get("measured_cpu_s") else None,
            **cpu, "predicted_ms": {cands[i]["label"]: round(preds[i]["step_s"] * 1e3, 1) for i in range(len(cands))}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="meshes/bench-32m.yaml")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--share", type=float, default=0.2, help="share of the candidates the tuner may measure")
    ap.add_argument("--calibrate", default="0,2,3", help="calibration counts to replay, comma-separated")
    ap.add_argument("--from", dest="from_json", help="analyse this `tune layout --top 100000 --json` report "
                                                     "instead of running the sweep")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.from_json:
        rep = json.loads(Path(args.from_json).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "report.json"
            subprocess.run([sys.executable, "-m", "picotron_jax.cli", "tune", "layout", "--config", args.config,
                            "--devices", str(args.devices), "--top", "100000", "--cache-dir", "none",
                            "--json", str(out), *rest], check=True)
            rep = json.loads(out.read_text())
    cands = [c for c in rep["candidates"] if c["measured_step_s"] is not None]  # predicted order
    sims = [simulate(rep, args.share, 0, cpu_terms=False)]
    sims += [simulate(rep, args.share, int(k)) for k in args.calibrate.split(",")]
    print("| layout | peak MiB | measured ms | CPU s | tokens/s | " +
          " | ".join(f"predicted ms ({s['model']})" for s in sims) + " |")
    print("|---|---|---|---|---|" + "---|" * len(sims))
    for c in sorted(cands, key=lambda c: c["measured_step_s"]):
        cpu = f"{c['measured_cpu_s']:.2f}" if c.get("measured_cpu_s") is not None else "-"
        print(f"| {c['label']} | {c['peak_bytes'] / 2**20:.1f} | {c['measured_step_s'] * 1e3:.1f} | {cpu} | "
              f"{c['measured_tokens_per_s']:,.0f} | " +
              " | ".join(f"{s['predicted_ms'][c['label']]:.1f}" for s in sims) + " |")
    summary = {"config": args.from_json or args.config, "devices": args.devices, "measured": len(cands),
               "failed": [c["label"] for c in rep["candidates"] if c["error"]],
               "tuner": [{k: v for k, v in s.items() if k != "predicted_ms"} for s in sims]}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "report": rep}, indent=2) + "\n")


if __name__ == "__main__":
    main()
