"""What resuming from quantised Adam moments costs: the loss curve after a resume from a checkpoint whose
moments were stored as bf16 or int8 (checkpoint.quantize_optimizer), against a lossless resume.

`--from STEP_DIR` is a lossless checkpoint of a trained run at step S (its config comes from its metadata).
Its state is saved once per mode (none, bf16, int8) into a scratch run, and each is resumed for `--steps`
steps with the same config and data (batch i is a pure function of (seed, data, i)), one after the other
in this process. As a yardstick, a fourth run resumes with both moments zeroed (what losing the optimizer
state costs). Reported: the loss of every step, the largest and mean |loss - lossless loss|, and the mean
difference over the last 10 steps. Losses are deterministic, so one run per mode suffices.

    PYTHONPATH=. python benchmarks/quantized_resume.py --from RUN/checkpoints/150 --steps 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from picotron_jax.checkpoint.manager import Checkpointer
from picotron_jax.checkpoint.restore import read_meta, restore_train_state
from picotron_jax.config import config_from_dict
from picotron_jax.run import build_run
from picotron_jax.trainer import Trainer

MODES = ("none", "bf16", "int8", "zeroed moments")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="a lossless step folder of a trained run")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--scratch", default="/tmp/picotron-quantized-resume")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()

    step_dir, scratch = Path(args.source).absolute(), Path(args.scratch)
    base = config_from_dict(read_meta(step_dir)["config"])
    run = build_run(base, data=False)
    state, _, _ = restore_train_state(str(step_dir), run.setup.abstract, run.setup.shardings, base)
    start = int(state.step)
    losses, sizes = {}, {}
    for mode in MODES:
        stored = "none" if mode == "zeroed moments" else mode
        cfg = base.replace(checkpoint={"quantize_optimizer": stored, "every": 0, "keep": 0, "async_save": False},
                           logging={"every": 1, "progress": False})
        folder = scratch / mode.replace(" ", "_")
        shutil.rmtree(folder, ignore_errors=True)
        ckpt = Checkpointer(folder / "saved", cfg, say=lambda _m: None)
        saved = state if mode != "zeroed moments" else state.replace(opt_state=jax.tree_util.tree_map_with_path(
            lambda p, x: x * 0 if any(getattr(k, "name", None) in ("mu", "nu") for k in p) else x, state.opt_state))
        ckpt.save(saved, {"mesh": read_meta(step_dir).get("mesh")})
        ckpt.close()
        sizes[mode] = ckpt.store.bytes_on_disk(start)
        trainer = Trainer(cfg, resume_from=str(folder / "saved"))  # no run directory: nothing written
        trainer.run(args.steps)
        trainer.close()
        losses[mode] = {r["step"]: r["loss"] for r in trainer.history if "loss" in r}
    steps = sorted(losses["none"])
    ref = np.array([losses["none"][s] for s in steps])
    report = {"checkpoint": str(step_dir), "resumed_at": start, "steps": args.steps, "bytes_on_disk": sizes,
              "losses": {m: [losses[m][s] for s in steps] for m in MODES}, "difference": {}}
    for mode in MODES[1:]:
        d = np.array([losses[mode][s] for s in steps]) - ref
        report["difference"][mode] = {"max_abs": float(np.max(np.abs(d))),
                                      "mean_abs": float(np.mean(np.abs(d))),
                                      "mean_last_10": float(np.mean(d[-10:])),
                                      "final": float(d[-1]),
                                      "first_5": [float(x) for x in d[:5]]}
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=2))
    for s in steps[:: max(1, len(steps) // 10)] + [steps[-1]]:
        print(f"step {s:>5}: " + "  ".join(f"{m} {losses[m][s]:.4f}" for m in MODES))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
