"""`picotron-jax profile`: capture steady steps, name the bottleneck, and check the advice.

    picotron-jax profile --config FILE [overrides] [--steps N] [--start S] --out DIR
    picotron-jax profile --out DIR --apply K            # the K-th suggestion as a preset YAML
    picotron-jax profile --out DIR --apply K --verify   # ... and run it: measured gain vs estimate
    picotron-jax profile --compare RUN_A RUN_B          # two profiles, category by category, module by module
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from picotron_jax.errors import UserError


def add_parser(sub, add_config_args) -> None:
    p = sub.add_parser("profile", help="profile steady steps: time, FLOPs, memory and bytes per module and device; "
                                       "ranked bottlenecks with suggested settings")
    add_config_args(p)
    p.add_argument("--out", help="folder for the trace, profile.json and profile.md")
    p.add_argument("--steps", type=int, default=3, help="steps to trace (default 3)")
    p.add_argument("--start", type=int, default=3, help="first traced step (default 3: steps 1-2 compile and warm up)")
    p.add_argument("--apply", type=int, metavar="K", help="write the K-th suggestion of DIR/profile.json as a preset")
    p.add_argument("--verify", action="store_true", help="run the suggestion (--apply K, default 1) next to the "
                                                         "profiled config and report the measured gain")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two profiles (folders or "
                                                                            "profile.json files)")
    p.add_argument("--json", dest="json_out", help="--compare: also write the comparison as JSON")


def cmd_profile(args, load) -> int:
    if args.compare:
        from picotron_jax.profile.compare import compare, format_compare, load_profile

        result = compare(load_profile(args.compare[0]), load_profile(args.compare[1]))
        print(format_compare(result, *args.compare))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if not args.out:
        raise UserError("profile needs --out DIR (where the trace, profile.json and profile.md go), or --compare A B")
    out = Path(args.out)
    if args.steps < 1 or args.start < 2:
        raise UserError(f"--steps {args.steps} --start {args.start}: need --steps >= 1 and --start >= 2 (step 1 "
                        f"compiles the step; profile steady steps)")
    from picotron_jax.config import load_config

    have = (out / "profile.json").is_file() and (out / "config.yaml").is_file()
    if args.config or args.overrides or not have:
        cfg = load(args)
        report = run_profile(cfg, out, args.steps, args.start)
    else:
        cfg = load_config(out / "config.yaml")
        report = json.loads((out / "profile.json").read_text())
    if args.apply is not None or args.verify:
        k = args.apply or 1
        finding = _finding(report, k, out)
        path = write_suggestion(cfg, finding, out / f"suggestion-{k}.yaml")
        print(f"suggestion {k} ({finding['kind']}): {' '.join(finding['suggestion'])} -> {path}")
        if args.verify:
            from picotron_jax.profile.report import write_report
            from picotron_jax.profile.verify import verify

            report["verify"] = verify(cfg, finding, log=lambda s: print(s, file=sys.stderr))
            write_report(report, out)
            v = report["verify"]
            print(f"verify: measured gain {v['measured_gain']:.1%}, estimated {v['estimated_gain_here']:.1%} on this "
                  f"machine ({v['estimated_gain']:.1%} device model): "
                  f"{'within' if v['within_tolerance'] else 'outside'} ±{v['tolerance']:.1%}")
    return 0


def run_profile(cfg, out: Path, steps: int, start: int) -> dict:
    """Train start + steps - 1 steps with a profiling window over the last `steps`; analyse; print."""
    from picotron_jax.config import save_config
    from picotron_jax.profile.report import summary_lines
    from picotron_jax.profile.verify import _quiet
    from picotron_jax.profile.window import analyse_and_write
    from picotron_jax.profile.capture import ProfileWindow
    from picotron_jax.trainer import Trainer

    run_cfg = _quiet(cfg).replace(train={"steps": start + steps - 1})
    run_cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    save_config(run_cfg, out / "config.yaml")
    window = ProfileWindow(start, steps, out)
    trainer = Trainer(run_cfg, callbacks=[window])
    try:
        trainer.run()
    finally:
        trainer.close()
    if not window.done:
        raise UserError(f"the run stopped before the profiling window ended (step {trainer.step_count}); nothing "
                        f"to analyse")
    report = analyse_and_write(out, run_cfg, trainer.built.devices)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {out / 'profile.md'} and {out / 'profile.json'}; trace: xprof --logdir {out / 'trace'}")
    return report


def _finding(report: dict, k: int, out: Path) -> dict:
    findings = report.get("findings", [])
    if not 1 <= k <= len(findings):
        raise UserError(f"--apply {k}: {out / 'profile.json'} has {len(findings)} finding(s)"
                        + (f"; choose 1 to {len(findings)}" if findings else ""))
    if not findings[k - 1]["suggestion"]:
        raise UserError(f"--apply {k}: finding {k} ({findings[k - 1]['kind']}) has no setting to change: "
                        f"{findings[k - 1]['evidence']}")
    return findings[k - 1]


def write_suggestion(cfg, finding: dict, path: Path) -> Path:
    from picotron_jax.config import save_config

    new = cfg.with_overrides(finding["suggestion"])
    new.validate()
    save_config(new, path)
    text = path.read_text()
    path.write_text(f"# picotron-jax profile: suggestion ({finding['kind']}): {' '.join(finding['suggestion'])}\n"
                    f"# {finding['title']}; estimated gain {finding['estimated_gain']:.1%} of the step\n" + text)
    return path
