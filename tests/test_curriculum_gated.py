"""Performance-gated curriculum pacing (data/curriculum_gate.py): the gate advances exactly when its rule says
on a synthetic eval-loss sequence, reads of undecided steps are refused, a gated run stopped after an advance
and resumed equals the uninterrupted run bitwise (the stage starts travel in the checkpoint through the
callback state protocol, callback.py), clear config errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.callback import Callback
from picotron_jax.checkpoint.restore import read_meta
from picotron_jax.checkpoint.storage import open_store
from picotron_jax.config import CurriculumConfig
from picotron_jax.data.curriculum import Curriculum
from picotron_jax.data.curriculum_gate import MIN_GATE_DELAY, PlateauGate, gated_percentiles
from picotron_jax.errors import UserError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=8", "optimizer.warmup_steps=2",
        "logging.progress=false", "memory.live_arrays=false", "logging.every=1"]
DIFF_GATED = ["curriculum.kind=difficulty", "curriculum.pacing=gated", "curriculum.start_percentile=20",
              "eval.tokens=256", "eval.every=1"]
GATED = ["curriculum.kind=seqlen", "curriculum.pacing=gated", "curriculum.start_seq_len=4", "curriculum.seq_len_step=4",
         "eval.tokens=256", "eval.every=2"]


def tiny(*more: str) -> pj.Config:
    return pj.load_config("single", [*TINY, *more])


def test_gate_advances_exactly_when_the_plateau_or_threshold_rule_says():
    gate = PlateauGate(num_stages=3, eval_every=10, delay=15, patience=2, min_delta=0.1, threshold=2.0)
    # stage 0: a plateau needs patience + 1 = 3 evaluations; best of the last 2 vs best before, 10% relative
    assert gate.observe(10, 5.0) == ""
    assert gate.observe(20, 4.0) == ""
    assert gate.observe(30, 3.5) == ""  # best 3.5 of (4.0, 3.5) vs 5.0 before: improved 30%
    assert gate.observe(40, 3.4) == ""  # 3.4 vs 4.0: 15%
    assert gate.observe(45, 9.9) == ""  # not a scheduled evaluation (45 % 10): ignored
    assert gate.observe(50, 3.3).startswith("eval loss plateaued")  # 3.3 vs 3.5: 5.7% < 10%
    assert gate.starts == [1, 65] and gate.stage_evals == []  # stage 1 begins at 50 + delay
    assert gate.observe(50, 0.1) == ""  # the same evaluation again (Trainer.evaluate()): ignored
    assert gate.observe(60, 1.0) == "" and gate.stage_evals == []  # before stage 1 began: measures stage 0
    assert gate.observe(70, 2.5) == ""
    assert "gate_loss" in gate.observe(80, 1.9)  # crossed the threshold: 1.9 <= 2.0
    assert gate.starts == [1, 65, 95]
    assert gate.observe(100, 0.5) == "" and gate.starts == [1, 65, 95]  # the last stage: nothing more to advance
    assert [gate.stage(s) for s in (1, 64, 65, 94, 95, 10_000)] == [0, 0, 1, 1, 2, 2]
    # the checkpointed state (JSON in the metadata) restores the same stages and the same next decision
    fresh = PlateauGate(3, 10, 15, 2, 0.1, 2.0)
    mid = PlateauGate(3, 10, 15, 2, 0.1, 2.0)
    for step, loss in ((10, 5.0), (20, 4.0), (30, 3.5), (40, 3.4)):
        mid.observe(step, loss)
    fresh.load_state_dict(json.loads(json.dumps(mid.state_dict())))
    assert fresh.observe(50, 3.3) == mid.observe(50, 3.3) != "" and fresh.starts == mid.starts == [1, 65]


def test_min_delta_zero_plateaus_only_without_improvement_and_patience_counts_stage_evals():
    gate = PlateauGate(num_stages=2, eval_every=1, delay=4, patience=1, min_delta=0.0)
    assert [gate.observe(s, v) for s, v in ((1, 3.0), (2, 2.9), (3, 2.8))] == ["", "", ""]  # still improving
    assert gate.observe(4, 2.8) != "" and gate.starts == [1, 8]  # no improvement over 1 eval: plateau


def test_reading_a_step_whose_stage_is_not_decided_is_refused():
    c = Curriculum(CurriculumConfig(kind="seqlen", pacing="gated", start_seq_len=4, seq_len_step=4, gate_delay=4,
                                    gate_patience=1, gate_loss=10.0), 16, eval_every=2)
    assert c.lengths == [4, 8, 16] and c.buckets(100) == [4, 8, 16]
    assert [c.length(s) for s in range(1, 6)] == [4] * 5  # steps <= 5 depend on no evaluation (5 - 4 < 2)
    with pytest.raises(RuntimeError, match="stage of step 6"):
        c.length(6)  # shaped by the evaluation of step 2, not seen yet
    c.gate.observe(2, 5.0)  # below gate_loss: stage 1 begins at step 6
    assert [c.length(s) for s in range(1, 8)] == [4] * 5 + [8, 8]


def gate_of(trainer: pj.Trainer) -> PlateauGate:
    return next(cb for cb in trainer.callbacks if hasattr(cb, "curriculum")).curriculum.gate


class CountSteps(Callback):
    """A callback with a state: the steps it has seen."""

    def __init__(self):
        self.seen = 0
        self.loaded: dict | None = None

    def on_step_end(self, trainer, step, outputs):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.loaded, self.seen = state, state["seen"]


def test_callback_state_is_saved_in_the_checkpoint_and_handed_back_on_restore(tmp_path):
    counter = CountSteps()
    with pj.Trainer(tiny("train.steps=3"), tmp_path / "run", callbacks=[counter, Callback()]) as first:
        counter.seen = 5
        first.save()  # step 0: no step compiled
    meta = read_meta(open_store(str(tmp_path / "run" / "checkpoints"), 0, 0).fetch(0))
    assert meta["callbacks"]["CountSteps"] == {"seen": 5}
    assert "Callback" not in meta["callbacks"]  # the stateless Callback stores nothing
    again = CountSteps()
    with pj.Trainer.restore(tmp_path / "run", callbacks=[again]):
        assert again.loaded == {"seen": 5} and again.seen == 5


@pytest.mark.slow  # three trainers, two length buckets each: about 30 s on an idle 2-core machine
def test_gated_run_stopped_after_an_advance_resumes_bitwise(tmp_path):
    # patience 1 and min_delta 0.5: a stage ends at its second evaluation unless the loss halves between them
    cfg = tiny("train.steps=12", *GATED, "curriculum.gate_patience=1", "curriculum.gate_min_delta=0.5",
               "checkpoint.require_lossless=true")
    with pj.Trainer(cfg.replace(train={"stop_at_step": 9}), tmp_path / "stopped") as first:
        assert first.run().stopped_early == "train.stop_at_step"  # its extra evaluation at step 9 is unscheduled
    saved = read_meta(open_store(str(tmp_path / "stopped" / "checkpoints"), 0, 0).fetch(9))["callbacks"]["SeqLenWarmup"]
    assert saved["starts"] == [1, 8] and [s for s, _ in saved["stage_evals"]] == [8]
    with pj.Trainer.restore(tmp_path / "stopped") as resumed:
        rest = resumed.run()
        params = [np.asarray(x) for x in jax.tree.leaves(resumed.params)]
        resumed_starts = gate_of(resumed).starts
    straight = pj.Trainer(cfg)
    whole = straight.run()
    # evaluations at 2, 4: stage 1 from 4 + 4; 6 measures stage 0; 8, 10: stage 2 from 14 (after the run)
    assert gate_of(straight).starts == resumed_starts == [1, 8, 14]
    rows = [r for r in whole.rows if r["kind"] == "train"]
    assert [r["seq_len"] for r in rows] == [4] * 7 + [8] * 5
    assert [r["curriculum_stage"] for r in rows] == [0] * 7 + [1] * 5
    assert [r["curriculum_stage_step"] for r in rows] == [1] * 7 + [8] * 5
    for x, y in zip(params, jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    losses = {r["step"]: (r["loss"], r["seq_len"]) for r in rows}
    assert [(r["step"], (r["loss"], r["seq_len"])) for r in rest.rows if r["kind"] == "train"] == \
        [(s, losses[s]) for s in range(10, 13)]
    straight.close()


@pytest.mark.parametrize("override, field", [
    ("eval.tokens=0", "eval.tokens"),
    ("eval.every=0", "eval.every"),
    ("curriculum.gate_loss=-1", "curriculum.gate_loss"),
    ("curriculum.gate_patience=0", "curriculum.gate_patience"),
    ("curriculum.gate_min_delta=1.5", "curriculum.gate_min_delta"),
    ("curriculum.gate_delay=3", "curriculum.gate_delay"),  # the loop may have read step e + 3 at the eval of e
    ("curriculum.start_seq_len=6", "curriculum.start_seq_len"),
])
def test_bad_gated_settings_name_the_field(override, field):
    tiny(*GATED).validate()  # gated needs no curriculum.steps
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        tiny(*GATED, override).validate()


def test_the_loop_prefetch_reads_at_most_read_ahead_steps_past_the_step_being_processed():
    import time

    from picotron_jax.data.loader import PREFETCH_BATCHES, READ_AHEAD_STEPS, prefetch

    started: list[int] = []

    def reads():
        for index in range(20):
            started.append(index)
            yield index

    batches = prefetch(reads(), size=PREFETCH_BATCHES)
    assert next(batches) == 0  # step 1's batch: its events run now
    time.sleep(0.5)  # the thread reads as far ahead as it can
    assert max(started) == READ_AHEAD_STEPS  # index 3 = step 4 = step 1 + READ_AHEAD_STEPS, never step 5
    assert MIN_GATE_DELAY == READ_AHEAD_STEPS + 1 == 4  # so a stage decided at step e begins after every read
    batches.close()


@pytest.mark.slow  # default suite under 20 minutes
def test_difficulty_gated_draws_from_the_stage_percentile_and_keeps_its_gate_in_the_checkpoint(tmp_path):
    assert gated_percentiles(20, 4) == [20, 46, 73, 100]  # 20 + 80 k // 3
    rng = np.random.default_rng(0)  # a small corpus whose lines differ in difficulty (test_curriculum_difficulty.py)
    lines = ["ab " * int(rng.integers(2, 30)) if i % 2 else "".join(map(chr, rng.integers(97, 123, 60)))
             for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    # gate_loss 100: every counted evaluation advances; eval.every 1, delay 4: stages begin at 1, 1 + 4, 5 + 4
    cfg = tiny(*DIFF_GATED, "curriculum.gate_loss=100", "train.steps=6", f"data.source={tmp_path / 'corpus.txt'}",
               f"data.cache_dir={tmp_path / 'tokens'}")
    with pj.Trainer(cfg, tmp_path / "run") as trainer:
        rows = [r for r in trainer.run().rows if r["kind"] == "train"]
        trainer.save()
    assert [r["curriculum_percentile"] for r in rows] == [20] * 4 + [46] * 2
    assert [r["curriculum_stage_step"] for r in rows] == [1] * 4 + [5] * 2
    assert rows[0]["difficulty_max"] < rows[-1]["difficulty_max"]  # the stage-1 pool holds harder windows
    saved = read_meta(open_store(str(tmp_path / "run" / "checkpoints"), 0, 0).fetch(6))["callbacks"]["DifficultyWarmup"]
    assert saved["starts"] == [1, 5, 9] and saved["evaluated_through"] == 6
    with pj.Trainer.restore(tmp_path / "run") as resumed:
        assert gate_of_difficulty(resumed).starts == [1, 5, 9]


def gate_of_difficulty(trainer: pj.Trainer) -> PlateauGate:
    return next(cb for cb in trainer.callbacks if type(cb).__name__ == "DifficultyWarmup").gate


@pytest.mark.parametrize("override, field", [
    ("curriculum.gate_stages=1", "curriculum.gate_stages"),
    ("eval.every=0", "eval.every"),
    ("curriculum.start_percentile=0", "curriculum.start_percentile"),
])
def test_bad_difficulty_gated_settings_name_the_field(override, field):
    tiny(*DIFF_GATED).validate()  # gated needs no curriculum.steps
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        tiny(*DIFF_GATED, override).validate()


def test_a_resume_without_the_gates_state_is_refused_naming_the_pacing():
    from types import SimpleNamespace

    from picotron_jax.data.curriculum import SeqLenWarmup

    cb = SeqLenWarmup(tiny(*GATED))
    cb.on_run_start(SimpleNamespace(step_count=1))  # before the first scheduled evaluation: nothing to miss
    with pytest.raises(UserError, match=r"curriculum\.pacing"):
        cb.on_run_start(SimpleNamespace(step_count=4))  # a checkpoint of step 4 that held no gate state
    cb.load_state_dict({"starts": [1, 6], "stage_evals": [], "evaluated_through": 4})
    cb.on_run_start(SimpleNamespace(step_count=4))
    assert cb.curriculum.length(6) == 8  # the loaded stage starts shape the lengths
