"""Every user error of `train`: exit code 2, one line on stderr, no traceback, no file created or changed."""

from __future__ import annotations

import pytest

from picotron_jax.cli import main
from test_api import TINY

BASE = ["train", "--config", "single", *TINY, "train.steps=2"]


def prepare_used(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("train: {steps: 9}\n")
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1}\n')


CASES = {
    "yaml_list": (lambda t: (t / "c.yaml").write_text("- a\n- b\n"), ["train", "--config", "{t}/c.yaml"], "mapping"),
    "yaml_scalar": (lambda t: (t / "c.yaml").write_text("3\n"), ["train", "--config", "{t}/c.yaml"], "mapping"),
    "run_dir_is_a_file": (lambda t: (t / "f").write_text("x"), [*BASE, "--run-dir", "{t}/f"], "is a file"),
    "global_batch_0": (None, [*BASE, "--run-dir", "{t}/run", "train.global_batch=0"], "train.global_batch"),
    "hdfs_checkpoint_dir": (None, [*BASE, "--run-dir", "{t}/run", "checkpoint.dir=hdfs://nn/x"], "hdfs://"),
    "lr_inf": (None, [*BASE, "--run-dir", "{t}/run", "optimizer.lr=inf"], "optimizer.lr"),
    "lr_nan": (None, [*BASE, "--run-dir", "{t}/run", "optimizer.lr=nan"], "optimizer.lr"),
    "unknown_field": (None, [*BASE, "--run-dir", "{t}/run", "model.nope=1"], "model.nope"),
    "resume_without_checkpoint": (None, [*BASE, "--run-dir", "{t}/run", "--resume"], "no checkpoint"),
    "mesh_limited_by_num_devices": (None, [*BASE, "--run-dir", "{t}/run", "mesh.data=2"], "mesh.num_devices"),
    "used_run_dir": (prepare_used, [*BASE, "--run-dir", "{t}/run"], "already holds a run"),
}


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.is_dir(), p.read_bytes() if p.is_file() else b"")
            for p in folder.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_exits_2_in_one_line_and_writes_nothing(case, tmp_path, capsys):
    prepare, argv, names = CASES[case]
    if prepare is not None:
        prepare(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main([a.replace("{t}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before
