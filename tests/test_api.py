"""The Python API: Trainer runs, continues, restores and reconfigures exactly like the command line."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import picotron_jax as pj
from helpers import MESHES
from picotron_jax.callback import Callback
from picotron_jax.cli import main
from picotron_jax.errors import UserError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=8", "optimizer.warmup_steps=2",
        "logging.progress=false", "memory.live_arrays=false"]


def tiny(name: str = "single", *more: str) -> pj.Config:
    return pj.load_config(name, [*TINY, *more])


def params_of(trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(trainer.params)]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_bitwise(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


SAME = ("step", "loss", "grad_norm", "lr", "z_loss", "tokens")


def test_load_config_takes_preset_names_and_replace_checks_fields():
    cfg = pj.load_config("tp2-dp4", ["train.steps=7"])
    assert cfg.mesh.tensor == 2 and cfg.train.steps == 7
    changed = cfg.replace(train={"steps": 50}, optimizer={"lr": 1e-3})
    assert (changed.train.steps, changed.optimizer.lr, changed.mesh.tensor, cfg.train.steps) == (50, 1e-3, 2, 7)
    with pytest.raises(UserError, match="config field 'train.steps' = 'many': expected int"):
        cfg.replace(train={"steps": "many"})
    with pytest.raises(UserError, match="unknown config key 'train.stepz'"):
        cfg.replace(train={"stepz": 1})
    with pytest.raises(UserError, match="unknown config section 'trian'"):
        cfg.replace(trian={"steps": 1})
    with pytest.raises(UserError, match="tensor=3 has 12 devices but the run uses 8"):
        cfg.replace(mesh={"tensor": 3}).validate(8)
    with pytest.raises(UserError, match="preset name"):
        pj.load_config("no-such-preset")


def test_k_steps_then_k_more_equals_2k_steps_bitwise_and_step_rows_equal_the_cli_rows(tmp_path):
    cfg = tiny("single", "train.steps=6", "logging.every=1")
    split = pj.Trainer(cfg)
    first = split.run(3)
    second = split.run()  # continues from step 3 to train.steps
    assert (first.steps, first.steps_run, second.steps, second.steps_run) == (3, 3, 6, 3)
    straight = pj.Trainer(cfg)
    stepped = [straight.step() for _ in range(6)]
    assert straight.step_count == 6 and int(straight.state.step) == 6
    assert_bitwise(params_of(split), params_of(straight))
    assert main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(tmp_path / "cli"), *TINY,
                 "train.steps=6", "logging.every=1"]) == 0
    cli_rows = rows_of(tmp_path / "cli")
    assert [{k: r[k] for k in SAME} for r in stepped] == [{k: r[k] for k in SAME} for r in cli_rows]
    assert [{k: r[k] for k in SAME} for r in first.rows + second.rows] == [{k: r[k] for k in SAME} for r in cli_rows]


def test_restore_after_the_cli_stop_at_step_continues_bitwise(tmp_path):
    common = ["--config", str(MESHES / "single.yaml"), *TINY, "train.steps=6", "logging.every=1",
              "checkpoint.require_lossless=true"]
    assert main(["train", "--run-dir", str(tmp_path / "stopped"), *common, "train.stop_at_step=3"]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "straight"), *common, "checkpoint.every=6"]) == 0
    with pj.Trainer.restore(tmp_path / "stopped") as trainer:
        assert trainer.step_count == 3
        summary = trainer.run()
        assert summary.steps == 6 and not summary.stopped_early
        trainer.save()
    straight = pj.Trainer.restore(tmp_path / "straight" / "checkpoints" / "6")
    assert_bitwise(params_of(trainer), params_of(straight))
    losses = {r["step"]: r["loss"] for r in rows_of(tmp_path / "straight")}
    assert [(r["step"], r["loss"]) for r in summary.rows] == [(s, losses[s]) for s in (4, 5, 6)]


class Recorder(Callback):
    """Records every event with its payload's essentials; asks for a save, a restore and a stop."""

    def __init__(self, save_at=(), restore_at=(), stop_at=None):
        self.events: list[tuple] = []
        self.save_at, self.restore_at, self.stop_at = set(save_at), set(restore_at), stop_at

    def on_run_start(self, trainer):
        self.events.append(("run_start", trainer.step_count))

    def on_step_start(self, trainer, step):
        self.events.append(("step_start", step))

    def on_log(self, trainer, row):
        assert isinstance(row["loss"], float) and row["kind"] == "train"
        self.events.append(("log", row["step"]))

    def on_eval(self, trainer, row):
        assert row["kind"] == "eval" and row["eval_tokens"] > 0 and np.isfinite(row["eval_loss"])
        self.events.append(("eval", row["step"]))

    def on_step_end(self, trainer, step, outputs):
        assert isinstance(outputs["loss"], jax.Array)  # device arrays: reading them is the callback's choice
        self.events.append(("step_end", step))
        if step in self.save_at:
            trainer.control.save()
        if step in self.restore_at:
            self.restore_at.discard(step)
            trainer.control.restore()
        if step == self.stop_at:
            trainer.control.stop("recorder asked")

    def on_checkpoint(self, trainer, step, path):
        assert path.endswith(f"/{step}")
        self.events.append(("checkpoint", step))

    def on_run_end(self, trainer, summary):
        self.events.append(("run_end", summary.steps, summary.stopped_early))


def test_callback_sees_the_documented_events_in_order_and_its_requests_are_honoured(tmp_path):
    cfg = tiny("single", "train.steps=5", "logging.every=2", "eval.tokens=256", "eval.every=2",
               "checkpoint.every=2", "checkpoint.async_save=false")
    recorder = Recorder(save_at=[1], restore_at=[3])
    trainer = pj.Trainer(cfg, tmp_path / "run", callbacks=[recorder])
    summary = trainer.run()
    trainer.close()
    expected = [("run_start", 0),
                ("step_start", 1), ("log", 1), ("step_end", 1), ("checkpoint", 1),
                ("step_start", 2), ("log", 2), ("eval", 2), ("step_end", 2), ("checkpoint", 2),
                ("step_start", 3), ("step_end", 3),  # restore: back to the checkpoint of step 2
                ("step_start", 3), ("step_end", 3),
                ("step_start", 4), ("log", 4), ("eval", 4), ("step_end", 4), ("checkpoint", 4),
                ("step_start", 5), ("log", 5), ("step_end", 5),
                ("eval", 5), ("checkpoint", 5),  # the end of the run: a final evaluation and save
                ("run_end", 5, "")]
    assert recorder.events == expected
    assert summary.eval_loss == trainer.history[-1]["eval_loss"]
    rows = rows_of(tmp_path / "run")
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("eval", 2), ("train", 4),
                                                      ("eval", 4), ("train", 5), ("eval", 5)]
    straight = pj.Trainer(tiny("single", "train.steps=5", "eval.tokens=256"))  # the same training windows
    straight.run()
    assert_bitwise(params_of(trainer), params_of(straight))  # the restore replayed step 3 exactly

    stopper = Recorder(stop_at=2)
    stopped = pj.Trainer(cfg, callbacks=[stopper]).run()
    assert stopped.steps == 2 and stopped.stopped_early == "recorder asked"
    assert stopper.events[-1] == ("run_end", 2, "recorder asked")


def test_unknown_callback_names_are_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(run_dir), *TINY,
                 "logging.callbacks=no_such_callback"])
    assert code == 2 and "'logging.callbacks' names 'no_such_callback'" in capsys.readouterr().err
    assert not run_dir.exists()
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(run_dir), *TINY,
                 "logging.callbacks=picotron_jax.nowhere:Thing"])
    assert code == 2 and "cannot be imported" in capsys.readouterr().err and not run_dir.exists()
    pj.register_callback("test_recorder", Recorder)
    trainer = pj.Trainer(tiny("single", "train.steps=1", "logging.callbacks=[test_recorder, helpers:Quiet]"))
    names = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ not in ("ClockStart", "ClockEnd")]
    assert names[-2:] == ["Recorder", "Quiet"]  # last but the step clock's closing stamp (observe/step_time.py)


def test_interrupted_run_leaves_the_trainer_usable_and_continues_bitwise():
    """Ctrl-C (the Jupyter stop button) once: stop after the step; twice: abort, with the state intact."""

    class Interrupt(Callback):
        def __init__(self, at: int, times: int):
            self.at, self.times = at, times

        def on_step_start(self, trainer, step):
            if step == self.at:
                self.at = -1
                for _ in range(self.times):  # one at a time: two pending SIGINTs may be handled as one
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(500):
                        if trainer._flag.requested:
                            break
                        time.sleep(0.01)
                    time.sleep(0.05)

    cfg = tiny("single", "train.steps=6")
    trainer = pj.Trainer(cfg, callbacks=[Interrupt(at=2, times=1)])
    summary = trainer.run()
    assert summary.stopped_early == "SIGINT" and trainer.step_count == 2
    trainer.add_callback(Interrupt(at=4, times=2))
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.step_count == 3 and int(trainer.state.step) == 3
    assert trainer.run().steps == 6
    straight = pj.Trainer(cfg)
    straight.run()
    assert_bitwise(params_of(trainer), params_of(straight))


def test_second_ctrl_c_during_a_step_waits_for_the_state():
    from picotron_jax.signals import StopFlag, stop_on_signals

    flag = StopFlag()
    with stop_on_signals(flag):
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.reason == "SIGINT"
        flag.in_step = True
        os.kill(os.getpid(), signal.SIGINT)  # the step's new state is not stored yet: deferred
        assert flag.abort_pending
        with pytest.raises(KeyboardInterrupt):
            flag.step_stored()


def test_shardings_table_and_reconfigure_onto_another_mesh():
    trainer = pj.Trainer(tiny("tp2-dp4", "train.steps=4"))
    table = trainer.shardings()
    wq = next(r for r in table if r.path == "layers.wq")
    assert wq.shape == (2, 32, 4, 8) and wq.device_shape == (2, 32, 2, 8) and "tensor" in wq.spec
    assert wq.bytes_per_device == 2 * 32 * 2 * 8 * 4 and "layers.wq" in str(table)
    trainer.run(2)
    before = params_of(trainer)
    trainer.reconfigure(mesh={"data": 8, "tensor": 1}, optimizer={"lr": 1e-4})
    assert trainer.mesh.shape["data"] == 8 and trainer.cfg.optimizer.lr == 1e-4
    assert_bitwise(before, params_of(trainer))  # moved, not changed
    assert trainer.run().steps == 4
    with pytest.raises(UserError, match="change the train state's arrays"):
        trainer.reconfigure(model={"num_layers": 3})
