"""A run directory belongs to one run (rundir.py); resume bookkeeping keeps each step once and re-saves
a step that was found corrupt."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

import picotron_jax as pj
from picotron_jax.cli import main
from picotron_jax.errors import UserError
from test_api import TINY, tiny
from test_checkpoint import damage

TRAIN = ["train", "--config", "single", *TINY, "logging.every=1", "checkpoint.every=2", "checkpoint.async_save=false"]


def steps_of(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def on_disk(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_second_run_into_a_used_directory_is_refused_and_overwrite_starts_a_run_of_its_own(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--run-dir", str(run), "train.steps=2"]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main([*TRAIN, "--run-dir", str(run), "train.steps=4", "optimizer.lr=1e-2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before  # nothing written or changed
    # --overwrite: the old run moves aside whole; the new one starts at step 1 and its resume continues it
    assert main([*TRAIN, "--run-dir", str(run), "--overwrite", "train.steps=4", "train.stop_at_step=2"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert steps_of(run) == [1, 2]
    capsys.readouterr()
    assert main([*TRAIN, "--run-dir", str(run), "--resume", "train.steps=4"]) == 0
    assert "at step 2" in capsys.readouterr().out
    assert steps_of(run) == [1, 2, 3, 4] and on_disk(run)[-1] == 4
    # a run directory that is a file
    (tmp_path / "file").write_text("x")
    assert main([*TRAIN, "--run-dir", str(tmp_path / "file"), "train.steps=1"]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_a_directory_locked_by_a_live_process_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(["sleep", "120"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "t"}))
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            pj.Trainer(tiny("single", "train.steps=1"), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    trainer = pj.Trainer(tiny("single", "train.steps=1"), run)  # the holder is gone: its lock is stale
    assert "taking over the stale lock" in capsys.readouterr().out
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    trainer.close()
    assert not (run / ".lock").exists()


def test_resume_past_a_corrupt_step_moves_it_aside_resaves_it_and_keeps_keep_good_steps(tmp_path, capsys):
    cfg = tiny("single", "train.steps=6", "logging.every=1", "checkpoint.every=1", "checkpoint.keep=2",
               "checkpoint.async_save=false")
    first = pj.Trainer(cfg, tmp_path)
    first.run(4)
    first.close()
    assert on_disk(tmp_path) == [3, 4]
    damage(tmp_path / "checkpoints" / "4")
    capsys.readouterr()
    resumed = pj.Trainer(cfg, tmp_path, resume=True)
    out = capsys.readouterr().out
    assert resumed.step_count == 3 and "moved unusable step 4 aside" in out
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir() and on_disk(tmp_path) == [3]
    resumed.run(2)
    resumed.close()
    assert on_disk(tmp_path) == [4, 5]  # step 4 saved again; keep=2 counts good steps only
    again = pj.Trainer(cfg, tmp_path, resume_from=str(tmp_path / "checkpoints" / "4"))
    assert again.step_count == 4
    again.close()


@pytest.mark.slow
def test_metrics_rows_are_unique_after_three_resumes(tmp_path):
    """Each resume replays the steps after the last checkpoint; their old rows are dropped first."""
    cfg = tiny("single", "train.steps=8", "logging.every=1", "checkpoint.every=2", "checkpoint.async_save=false")
    trainer = pj.Trainer(cfg, tmp_path)
    trainer.run(3)  # rows 1..3, checkpoint 2
    trainer.close()
    for n in (2, 2, None):  # resumes at 2 (to 4, checkpoint 4), at 4 (to 6), at 6 (to the end)
        trainer = pj.Trainer(cfg, tmp_path, resume=True)
        trainer.run(n)
        trainer.close()
    assert steps_of(tmp_path) == list(range(1, 9))


@pytest.mark.slow
def test_default_run_directories_are_one_per_run_and_runs_latest_links_the_newest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plain = ["train", "--config", "single", *TINY, "checkpoint.every=1", "checkpoint.async_save=false"]
    assert main([*plain, "train.steps=1"]) == 0
    assert main([*plain, "train.steps=1"]) == 0  # no refusal: a folder of its own
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all(p.name.startswith("single-") for p in runs)
    newest = max(runs, key=lambda p: p.stat().st_mtime_ns)
    assert (tmp_path / "runs" / "latest").is_symlink() and (tmp_path / "runs" / "latest").resolve() == newest
    capsys.readouterr()
    assert main([*plain, "train.steps=2", "--resume"]) == 0  # continues the newest run, in its folder
    assert "at step 1" in capsys.readouterr().out and on_disk(newest) == [1, 2] and steps_of(newest) == [1, 2]
