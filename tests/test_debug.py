"""The debugger's single-process pieces: the breakpoint language, breakpoints in the loop, crash reports,
replica consistency checks (the fault injector desynchronises one replica)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import picotron_jax as pj
from helpers import MESHES
from picotron_jax.cli import main
from picotron_jax.debug.breakpoint import Breakpoint
from picotron_jax.debug.expr import parse
from picotron_jax.errors import UserError
from test_api import TINY, params_of, tiny

KNOWN = {"step", "loss", "grad_norm", "lr"}
VALUES = {"step": 120.0, "loss": 6.0, "grad_norm": 3.0, "lr": 1e-4, "grad_norm_median": 0.25, "loss_mean": 5.5}


@pytest.mark.parametrize("text, expected", [
    ("loss > 5 and step > 100", True),
    ("loss > 5 and step > 200", False),
    ("grad_norm > 10 * grad_norm_median", True),
    ("grad_norm > 20 * grad_norm_median", False),
    ("not (lr < 1e-5) or loss != loss", True),
    ("loss - loss_mean >= 0.5", True),
    ("1 < grad_norm <= 3", True),
    ("(loss + 2) ** 2 / 4 == 16", True),
    ("-grad_norm < -4 or step % 7 == 1", True),
    ("step % 7 == 2", False),
    ("loss / 0 > 1e30", True),  # a division by zero is infinite, not an error
])
def test_valid_expressions_evaluate_against_the_metrics(text, expected):
    assert parse(text, KNOWN).evaluate(VALUES) is expected


@pytest.mark.parametrize("text, why", [
    ("__import__('os')", "a function call is not allowed"),
    ("__builtins__ > 1", "unknown name '__builtins__'"),
    ("loss.real > 1", "attribute access is not allowed"),
    ("abs(loss) > 1", "a function call is not allowed"),
    ("(lambda: 1) > 0", "a lambda is not allowed"),
    ("[x for x in (1, 2)]", "a comprehension is not allowed"),
    ("loss[0] > 1", "a subscript is not allowed"),
    ("10 ** 10 ** 10 > loss", "an exponent must be a number literal"),
    ("loss ** grad_norm > 1", "an exponent must be a number literal"),
    ("2 ** 100 > loss", "an exponent must be a number literal"),
    ("'a' < 'b'", "the constant 'a' (only numbers are allowed)"),
    ("(y := 3) > 1", "an assignment is not allowed"),
    ("loss if loss else 1", "a conditional expression is not allowed"),
    ("loss > 5 and", "not an expression"),
    ("loss > 5; import os", "not an expression"),
    ("temperature > 1", "unknown name 'temperature'"),
    ("loss @ loss", "the operator MatMult is not allowed"),
    ("loss > 1e999", "out of range"),
])
def test_hostile_or_malformed_expressions_are_rejected_with_their_position(text, why):
    with pytest.raises(UserError, match="column") as info:
        parse(text, KNOWN)
    assert why in str(info.value) and "debug.break_when" in str(info.value)


def test_a_hostile_breakpoint_stops_the_cli_at_start_with_exit_code_2(tmp_path, capsys):
    marker = tmp_path / "pwned"
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(tmp_path / "run"), *TINY,
                 f"debug.break_when=__import__('os').system('touch {marker}') or loss > 1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "a function call is not allowed" in err
    assert not marker.exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_breakpoint_hands_control_to_the_inspector_and_training_continues_identically():
    cfg = tiny("single", "train.steps=4")
    with pj.Trainer(cfg) as plain:
        plain.run()
    seen = []

    def inspector(ctx):
        seen.append((ctx.step, dict(ctx.metrics), np.asarray(ctx.batch["inputs"]).copy(),
                     float(np.asarray(ctx.state.step))))

    brk = Breakpoint("step >= 2 and loss < loss_max + 1", cfg, inspector=inspector)
    with pj.Trainer(cfg, callbacks=[brk]) as stopped:
        stopped.run()
        np.testing.assert_array_equal(seen[0][2], np.asarray(stopped.batch(1)["inputs"]))
    assert [s[0] for s in seen] == [2, 3, 4] and brk.fired == [2, 3, 4]
    assert all(s[3] == s[0] for s in seen)  # the state after the step that fired
    assert set(seen[0][1]) == {"step", "loss", "loss_max"} and math.isfinite(seen[0][1]["loss"])
    for a, b in zip(params_of(plain), params_of(stopped)):
        np.testing.assert_array_equal(a, b)


class Boom(pj.Callback):
    def on_step_end(self, trainer, step, outputs):
        if step == 2:
            raise RuntimeError("boom at step 2")


def test_an_unexpected_exception_writes_a_crash_report_and_a_checkpoint(tmp_path):
    cfg = tiny("single", "train.steps=4", "logging.every=1", "debug.save_on_crash=true")
    trainer = pj.Trainer(cfg, tmp_path, callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    report = json.loads((tmp_path / "debug" / "crash-2.json").read_text())
    assert report["exception"] == "RuntimeError: boom at step 2" and report["step"] == 2
    assert report["batch_index"] == 2 and report["last_metrics"]["step"] == 2
    assert any("boom at step 2" in line for line in report["traceback"])
    assert any("MainThread" in name for name in report["stacks"])
    assert report["config"]["train"]["steps"] == 4 and report["checkpoint"].endswith("2")
    with pj.Trainer.restore(tmp_path) as again:
        assert again.step_count == 2
    trainer.close()


def test_a_desynchronised_replica_is_caught_at_the_next_check_naming_the_array_and_device():
    """dp4 x tp2: the fault injector moves one element of one data-parallel copy of layers.wq by one ulp."""
    from picotron_jax.config import MESH_AXES
    from picotron_jax.debug.consistency import ReplicaCheck

    cfg = tiny("single", "mesh.num_devices=8", "mesh.data=4", "mesh.tensor=2", "train.steps=3", "debug.check_every=1",
               "faults.flip_step=2", "faults.flip_array=layers.wq", "faults.flip_replica=1")
    trainer = pj.Trainer(cfg)
    check = next(cb for cb in trainer.callbacks if isinstance(cb, ReplicaCheck))
    target = np.take(trainer.mesh.devices, 1, axis=MESH_AXES.index("data")).flat[0]
    with pytest.raises(pj.RunAborted) as info:
        trainer.run()
    assert check.checked == [1, 2] and trainer.step_count == 2  # step 1 was clean, step 2 was caught
    message = str(info.value)
    assert message.startswith("replicas diverged: params.layers.wq (slice [")
    assert f"differs on device {target.id} (process 0) from its 3 other copies" in message
    assert "debug.check_every = 1" in message
    trainer.close()


@pytest.mark.slow
def test_an_injected_nan_in_a_layers_forward_is_traced_to_that_layer_and_op(tmp_path, capsys):
    """The run stops at step 3 (NaN in layer 1's output); `debug nan --step 3` replays it from checkpoint 2."""
    cfg = tiny("single", "train.steps=4", "logging.every=1", "checkpoint.every=2", "faults.nan_step=3",
               "faults.nan_layer=1", "monitor.on_nan=stop")
    with pj.Trainer(cfg, tmp_path) as trainer, pytest.raises(pj.RunAborted):
        trainer.run()
    capsys.readouterr()
    assert main(["debug", "nan", str(tmp_path), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "replaying step 3 from checkpoint 2 on batch 2" in out
    assert "first non-finite value: select_n in forward pass, decoder layer 1," in out and "faults.py:" in out
    assert "finite 0%" in out  # the input statistics show the NaN operand
    print(out)
    assert main(["debug", "nan", str(tmp_path), "--step", "2"]) == 2
    assert "has no checkpoint before step 2" in capsys.readouterr().err


def _dump(process: int, fingerprint: str, collectives: list[str], stack_file: str, done: int) -> dict:
    return {"process": process, "num_processes": 3, "host": "h", "pid": 100 + process, "problem": "no step",
            "recorder": [{"phase": "step done", "step": done}, {"phase": "step", "step": done + 1}],
            "main_stack": [{"file": "/src/picotron_jax/trainer.py", "line": 115, "function": "_advance"},
                           {"file": stack_file, "line": 7, "function": "wait"}],
            "program": {"fingerprint": fingerprint, "collectives": collectives}}


def test_the_hang_report_names_differing_programs_and_missing_processes(tmp_path):
    """Synthetic dumps: process 1 compiled another program, process 2 left no dump; the launcher writes the
    report when process 0 did not."""
    from picotron_jax.debug.hang import load_dumps, report, write_report_if_missing

    (tmp_path / "debug").mkdir()
    jax_file = "/venv/lib/python3.11/site-packages/jax/_src/api.py"
    dumps = {0: _dump(0, "aaa", ["all-reduce replica_groups={{0,1}}", "all-gather replica_groups={{0,1}}"], jax_file, 4),
             1: _dump(1, "bbb", ["all-reduce replica_groups={{0,1}}", "reduce-scatter replica_groups={{0,1}}"],
                      jax_file, 4)}
    for p, d in dumps.items():
        (tmp_path / "debug" / f"hang-p{p}.json").write_text(json.dumps(d))
    assert sorted(load_dumps(tmp_path)) == [0, 1]
    text = report(load_dumps(tmp_path), 3)
    assert "hang report: 2 of 3 process(es) left a dump" in text
    assert "process 2: no dump" in text
    assert "programs differ: process(es) [0] compiled aaa; process(es) [1] compiled bbb" in text
    assert ("first differing collective, #1: process 0 runs all-gather replica_groups={{0,1}}, process 1 runs "
            "reduce-scatter replica_groups={{0,1}}") in text
    assert "likely cause: the processes run different programs" in text
    assert write_report_if_missing(tmp_path, 3) == tmp_path / "debug" / "hang-report.txt"
    assert (tmp_path / "debug" / "hang-report.txt").read_text() == text
    assert write_report_if_missing(tmp_path, 3) is None  # process 0's (or an earlier) report is kept
