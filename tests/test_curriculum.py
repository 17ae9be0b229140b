"""Curriculum learning (data/curriculum.py): DeepSpeed's pacing formulas, one compile per length bucket,
constant tokens per step, resume continues the same stages bitwise, clear config errors."""

from __future__ import annotations

import math
from contextlib import contextmanager

import jax
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.config import CurriculumConfig
from picotron_jax.data.curriculum import Curriculum, fixed_discrete, fixed_root
from picotron_jax.errors import UserError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=8", "optimizer.warmup_steps=2",
        "logging.progress=false", "memory.live_arrays=false", "logging.every=1"]
WARMUP = ["curriculum.kind=seqlen", "curriculum.start_seq_len=4", "curriculum.steps=4", "curriculum.seq_len_step=4"]


def tiny(name: str = "single", *more: str) -> pj.Config:
    return pj.load_config(name, [*TINY, *more])


def test_pacing_functions_match_deepspeeds_formulas_on_a_table_of_steps():
    # fixed_linear, min 8, max 128, 100 steps, difficulty_step 8: floor(s/100*120 + 8) rounded down to a multiple of 8
    linear = [fixed_root(s, 100, 8, 128, 8, 1) for s in (0, 1, 10, 33, 50, 99, 100, 150)]
    assert linear == [8, 8, 16, 40, 64, 120, 128, 128]
    for s in range(0, 101):
        expect = math.floor(s / 100 * 120 + 8)
        assert fixed_root(s, 100, 8, 128, 8, 1) == expect - expect % 8
    # fixed_root degree 2: floor(sqrt(s/100)*120 + 8) rounded down to a multiple of 8
    root = [fixed_root(s, 100, 8, 128, 8, 2) for s in (1, 4, 25, 50, 100)]
    assert root == [16, 32, 64, 88, 128]  # 20 -> 16, 32, 68 -> 64, 92.85 -> 88, 128
    # fixed_discrete: 32 while s <= 10, 64 while s <= 20, then 128
    assert [fixed_discrete(s, [32, 64, 128], [10, 20]) for s in (1, 10, 11, 20, 21, 500)] == [32, 32, 64, 64, 128, 128]


def test_lengths_snap_to_buckets_that_divide_seq_len_with_constant_tokens():
    c = Curriculum(CurriculumConfig(kind="seqlen", pacing="fixed_linear", start_seq_len=8, steps=100,
                                    seq_len_step=8), 128)
    assert c.lengths == [8, 16, 32, 64, 128]
    assert [c.length(s) for s in (1, 10, 33, 50, 99, 100)] == [8, 16, 32, 64, 64, 128]
    assert c.buckets(200) == [8, 16, 32, 64, 128]
    assert c.rows(16, 32) == 64  # 16 rows of 128 -> 64 rows of 32: the same tokens per step
    truncate = Curriculum(CurriculumConfig(kind="seqlen", start_seq_len=8, steps=100, constant_tokens=False), 128)
    assert truncate.length(33) == 40 and truncate.rows(16, 40) == 16


def test_batches_are_the_full_batch_cut_into_short_rows_on_a_data_parallel_mesh():
    trainer = pj.Trainer(tiny("dp8", "train.steps=4", *WARMUP))
    full = trainer.built.batch(0)  # the batch without the curriculum: [8, 16]
    read = trainer.callbacks.wrap_batches(trainer.built.batch)
    short = read(0)  # step 1: length 4, rows 32
    assert short["inputs"].shape == (32, 4) and short["inputs"].sharding == full["inputs"].sharding
    for name in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(np.asarray(short[name]), np.asarray(full[name]).reshape(32, 4))
    assert read(3)["inputs"].shape == (8, 16)  # step 4 = curriculum.steps: full length
    trainer.close()


@contextmanager
def count_compiles():
    events: list[str] = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.slow  # compiles one step per length bucket (the heaviest curriculum test)
def test_train_step_compiles_once_per_length_bucket_and_rows_log_the_stage():
    cfg = tiny("single", "train.steps=6", "train.seed=3", *WARMUP)
    trainer = pj.Trainer(cfg)
    buckets = next(cb for cb in trainer.callbacks if hasattr(cb, "curriculum")).curriculum.buckets(6)
    assert buckets == [4, 8, 16]  # steps 1..6: 4, 8, 8 (12 does not divide 16), 16, 16, 16
    with count_compiles() as curriculum_compiles:
        summary = trainer.run()
    plain = pj.Trainer(tiny("single", "train.steps=6", "train.seed=3"))
    with count_compiles() as plain_compiles:
        plain.run()
    # the plain run compiles its one step plus the loop's helpers; the curriculum run one step per bucket
    assert len(curriculum_compiles) - len(plain_compiles) == len(buckets) - 1
    rows = [r for r in summary.rows if r["kind"] == "train"]
    assert [r["seq_len"] for r in rows] == [4, 8, 8, 16, 16, 16]
    assert [r["curriculum_stage"] for r in rows] == [0, 1, 1, 2, 2, 2]
    assert all(r["tokens"] == 8 * 16 for r in rows)  # constant tokens per step


@pytest.mark.slow  # three trainers: about 30 s on an idle machine
def test_resumed_curriculum_run_continues_the_same_stages_bitwise(tmp_path):
    cfg = tiny("single", "train.steps=6", *WARMUP, "curriculum.pacing=fixed_root", "checkpoint.require_lossless=true",
               "eval.tokens=256")
    with pj.Trainer(cfg.replace(train={"stop_at_step": 2}), tmp_path / "stopped") as first:
        assert first.run().stopped_early == "train.stop_at_step"
    with pj.Trainer.restore(tmp_path / "stopped") as resumed:
        assert resumed.step_count == 2
        rest = resumed.run()
        params = [np.asarray(x) for x in jax.tree.leaves(resumed.params)]
    straight = pj.Trainer(cfg)
    whole = straight.run()
    for x, y in zip(params, jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    losses = {r["step"]: (r["loss"], r["seq_len"]) for r in whole.rows if r["kind"] == "train"}
    assert [(r["step"], (r["loss"], r["seq_len"])) for r in rest.rows if r["kind"] == "train"] == \
        [(s, losses[s]) for s in range(3, 7)]
    evals = [r for r in whole.rows if r["kind"] == "eval"]
    assert evals and evals[-1]["eval_tokens"] == 256  # evaluation runs at full length: 16 windows of 16


@pytest.mark.parametrize("override, field", [
    ("curriculum.kind=length", "curriculum.kind"),
    ("curriculum.pacing=exponential", "curriculum.pacing"),
    ("curriculum.start_seq_len=6", "curriculum.start_seq_len"),
    ("curriculum.steps=0", "curriculum.steps"),
])
def test_bad_curriculum_settings_name_the_field(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        tiny("single", *WARMUP, override).validate()
