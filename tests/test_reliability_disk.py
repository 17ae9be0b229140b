"""A full disk ends a run with one line and exit code 5; the previous checkpoint stays intact and no
temporary folder is left. The run directory is a small tmpfs, mounted in a user namespace (unshare);
the folder is copied out before the namespace ends, so the test can read what was left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from test_api import TINY
from test_checkpoint_kill import ENV

ARGS = ["--config", "single", *TINY, "train.steps=200", "logging.every=1", "checkpoint.every=1",
        "checkpoint.keep=0", "checkpoint.async_save=false"]


def can_mount_tmpfs(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp}"],
                           capture_output=True)
    return probe.returncode == 0


def train_on_tmpfs(tmp_path: Path, size: str, *more: str, timeout: int = 600) -> tuple[int, str, str, Path]:
    """Train into a tmpfs of `size`; returns (exit code, stdout, stderr, a copy of the run directory)."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    run.mkdir(parents=True)
    copy.mkdir()
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; shift 3; "$@"; code=$?; '
              'cp -a "$RUN"/. "$COPY"/; exit $code')
    cmd = ["unshare", "-rm", "sh", "-c", script, "sh", size, str(run), "--", sys.executable, "-m", "picotron_jax",
           "train", "--run-dir", str(run), *ARGS, *more]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "RUN": str(run), "COPY": str(copy)},
                          cwd=ROOT, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, copy


@pytest.fixture
def tmpfs_ok(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    if not can_mount_tmpfs(probe):
        pytest.skip("cannot mount a tmpfs here (unshare -rm refused)")


def test_a_disk_that_fills_up_ends_with_one_line_exit_5_and_the_previous_checkpoint_intact(tmp_path, tmpfs_ok):
    code, out, err, copy = train_on_tmpfs(tmp_path, "1500k")
    assert code == 5, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full:") and "intact" in lines[0], err
    assert "Traceback" not in out + err
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and not [p for p in (copy / "checkpoints").iterdir() if "tmp" in p.name]
    assert f"checkpoint {steps[-1] + 1} complete" not in out
    verify = subprocess.run([sys.executable, "-m", "picotron_jax", "ckpt", "info",
                             str(copy / "checkpoints" / str(steps[-1]))], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_a_first_save_that_does_not_fit_ends_with_one_line_and_leaves_no_temporary_folder(tmp_path, tmpfs_ok):
    code, out, err, copy = train_on_tmpfs(tmp_path, "200k")
    assert code == 5, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "disk full" in lines[0] and "Traceback" not in out + err, err
    leftovers = list((copy / "checkpoints").iterdir()) if (copy / "checkpoints").is_dir() else []
    assert not [p for p in leftovers if "tmp" in p.name or p.name.isdigit()], leftovers


def test_any_write_that_fails_with_enospc_ends_the_command_in_one_line_with_exit_5(monkeypatch, capsys):
    import errno

    from picotron_jax import cli

    def full(args):
        with open(os.devnull, "w"):
            raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setitem(cli.COMMANDS, "train", full)
    assert cli.main(["train"]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full writing runs/x/metrics.jsonl" in err


@pytest.mark.slow  # two training processes; the default suite keeps the fake writer's test above
def test_metrics_and_token_cache_writes_on_a_full_tmpfs_end_in_one_line_naming_the_file(tmp_path, tmpfs_ok):
    """Real ENOSPC, no fake writer: (1) metrics.jsonl and TensorBoard's event file fill a 64 KiB tmpfs (no
    checkpoints: checkpoint.every=0);
    (2) the token cache of a 400 KB corpus does not fit in data.cache_dir on a 64 KiB tmpfs. Each ends with
    one line naming the full file, exit code 5, no traceback, and the token cache leaves no partial file."""
    code, out, err, copy = train_on_tmpfs(tmp_path / "metrics", "64k", "checkpoint.every=0", "train.steps=100000",
                                          timeout=300)  # TensorBoard's writer thread once hung the run here
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 5 and len(lines) == 1 and "Traceback" not in out + err, (code, err[-3000:])
    assert lines[0].startswith("error: disk full writing "), lines
    assert "/metrics.jsonl" in lines[0] or "/tensorboard" in lines[0], lines  # whichever write failed first
    assert (copy / "metrics.jsonl").stat().st_size > 0
    assert not (copy / "checkpoints").is_dir() or not list((copy / "checkpoints").iterdir())  # no save was made

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 15_000)  # 405 KB of text: 810 KB of uint16 tokens
    code, out, err, copy = train_on_tmpfs(tmp_path / "cache", "64k", f"data.source={corpus}",
                                          f"data.cache_dir={tmp_path / 'cache' / 'run' / 'tokens'}", timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 5 and len(lines) == 1 and "Traceback" not in out + err, (code, err[-3000:])
    assert lines[0].startswith("error: disk full writing ") and "/tokens/" in lines[0], lines
    assert not list((copy / "tokens").iterdir()), list((copy / "tokens").iterdir())  # the partial file removed
