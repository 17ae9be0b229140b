"""Validation of `curriculum.kind=difficulty` (data/curriculum_difficulty.py); config_checks.py calls it."""

from __future__ import annotations

from picotron_jax.config import CurriculumConfig
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
    need(c.pacing in ("fixed_linear", "fixed_root"),
         f"config field 'curriculum.pacing' = {c.pacing!r}: kind=difficulty paces by percentile with fixed_linear "
         "or fixed_root")
    need(1 <= c.start_percentile <= 100,
         f"config field 'curriculum.start_percentile' = {c.start_percentile}: must be in 1..100 (the easiest share "
         "of the windows the first step draws from), e.g. curriculum.start_percentile=10")
    need(c.steps >= 1, f"config field 'curriculum.steps' = {c.steps}: must be >= 1 (steps to reach all windows)")
    need(c.pacing != "fixed_root" or c.root_degree >= 1,
         f"config field 'curriculum.root_degree' = {c.root_degree}: must be >= 1")
