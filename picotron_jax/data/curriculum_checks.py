"""Validation of `curriculum.kind=difficulty` (data/curriculum_difficulty.py) and of `curriculum.pacing=gated`
(data/curriculum_gate.py); config_checks.py calls them."""

from __future__ import annotations

from picotron_jax.config import Config, CurriculumConfig
from picotron_jax.errors import UserError


def validate_difficulty(c: CurriculumConfig) -> None:
    from picotron_jax.config_sections import CURRICULUM_METRICS

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(c.metric in CURRICULUM_METRICS,
         f"config field 'curriculum.metric' = {c.metric!r}: valid values are {', '.join(CURRICULUM_METRICS)}")
    need(c.metric != "reference" or bool(c.reference_checkpoint),
         "config field 'curriculum.reference_checkpoint' is empty: curriculum.metric=reference scores windows by a "
         "trained checkpoint's loss, e.g. curriculum.reference_checkpoint=runs/ref/checkpoints")
    need(c.metric != "field" or bool(c.score_field),
         "config field 'curriculum.score_field' is empty: curriculum.metric=field reads each document's difficulty "
         "from a field of the .jsonl/.parquet records, e.g. curriculum.score_field=difficulty")
    need(c.pacing in ("fixed_linear", "fixed_root", "gated"),
         f"config field 'curriculum.pacing' = {c.pacing!r}: kind=difficulty paces by percentile with fixed_linear, "
         "fixed_root or gated")
    need(1 <= c.start_percentile <= 100,
         f"config field 'curriculum.start_percentile' = {c.start_percentile}: must be in 1..100 (the easiest share "
         "of the windows the first step draws from), e.g. curriculum.start_percentile=10")
    need(c.pacing == "gated" or c.steps >= 1,
         f"config field 'curriculum.steps' = {c.steps}: must be >= 1 (steps to reach all windows)")
    need(c.pacing != "gated" or c.gate_stages >= 2,
         f"config field 'curriculum.gate_stages' = {c.gate_stages}: must be >= 2 (percentile stages from "
         "curriculum.start_percentile to 100)")
    need(c.pacing != "fixed_root" or c.root_degree >= 1,
         f"config field 'curriculum.root_degree' = {c.root_degree}: must be >= 1")
    need(c.mix_temperature >= 0,
         f"config field 'curriculum.mix_temperature' = {c.mix_temperature}: must be >= 0 (0 = draw only from the "
         "easiest pool; e.g. 0.05 also draws harder windows, e^-1 as often 5 percentiles past the pool)")


def validate_gated(cfg: Config) -> None:
    """The gate's settings; it reads the scheduled eval losses, so evaluation must run every eval.every steps."""
    from picotron_jax.data.curriculum_gate import MIN_GATE_DELAY

    c, e = cfg.curriculum, cfg.eval

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(e.enabled, "config field 'eval.tokens' = 0 (and eval.fraction = 0): curriculum.pacing=gated advances on "
                    "the eval loss, so it needs evaluation; hold out some tokens, e.g. eval.tokens=65536 eval.every=200")
    need(e.every >= 1, f"config field 'eval.every' = {e.every}: curriculum.pacing=gated decides at the scheduled "
                       "evaluations; set eval.every >= 1 (steps between evaluations), e.g. eval.every=200")
    need(c.gate_loss >= 0, f"config field 'curriculum.gate_loss' = {c.gate_loss}: must be >= 0 (0 = plateaus only)")
    need(c.gate_patience >= 1, f"config field 'curriculum.gate_patience' = {c.gate_patience}: must be >= 1 "
                               "(evaluations of a stage compared with its best before them)")
    need(0 <= c.gate_min_delta < 1, f"config field 'curriculum.gate_min_delta' = {c.gate_min_delta}: must be in "
                                    "[0, 1) (a relative improvement of the eval loss), e.g. 0.01")
    need(c.gate_delay >= MIN_GATE_DELAY,
         f"config field 'curriculum.gate_delay' = {c.gate_delay}: must be >= {MIN_GATE_DELAY}; the loop reads "
         f"batches up to {MIN_GATE_DELAY - 1} steps ahead, so a stage decided at step e can begin at e + "
         f"{MIN_GATE_DELAY} at the earliest")
