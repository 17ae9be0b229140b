"""The profiling window of a training run (config `profile`), analysed when it ends, and the analysis
entry point shared with `picotron-jax profile`."""

from __future__ import annotations

from pathlib import Path

import jax

from picotron_jax.config import Config
from picotron_jax.profile.capture import ProfileWindow


def analyse_and_write(out_dir: str | Path, cfg: Config, devices: list) -> dict:
    """Analyse a captured window, rank the findings, write profile.json and profile.md; returns the report."""
    from picotron_jax.profile.analysis import analyse
    from picotron_jax.profile.report import write_report
    from picotron_jax.profile.rules import find_bottlenecks

    report = analyse(out_dir, cfg)
    report["findings"] = find_bottlenecks(report, cfg, len(devices), devices)
    write_report(report, out_dir)
    return report


def profile_dir(cfg: Config, run_dir: Path | None) -> Path:
    base = Path(cfg.profile.dir) if cfg.profile.dir else Path(run_dir or cfg.logging.run_dir) / "profile"
    return base / f"process_{jax.process_index()}" if jax.process_count() > 1 else base


class ProfiledWindow(ProfileWindow):
    """`profile.start_step` / `profile.steps` in a run: trace the window, then analyse it (profile.analyze)."""

    def __init__(self, cfg: Config, run_dir: Path | None):
        super().__init__(cfg.profile.start_step, cfg.profile.steps, profile_dir(cfg, run_dir))
        self.analyze = cfg.profile.analyze
        self.report: dict | None = None

    def on_step_end(self, trainer, step, outputs):
        super().on_step_end(trainer, step, outputs)
        if self.done and self.report is None:
            self.report = {}
            if not self.analyze:
                trainer.say(f"profile: trace of steps {self.start}-{self.last} in {self.out / 'trace'}")
                return
            from picotron_jax.profile.report import summary_lines

            self.report = analyse_and_write(self.out, trainer.cfg, trainer.built.devices)
            for line in summary_lines(self.report):
                trainer.say(line)
            trainer.say(f"profile: {self.out / 'profile.md'}")
