"""No non-finite state is checkpointed or resumed (checkpoint/finite.py)."""

from __future__ import annotations

import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.checkpoint.finite import state_is_finite
from picotron_jax.checkpoint.manager import Checkpointer
from picotron_jax.cli import main
from test_api import tiny


def steps_on_disk(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_nan_between_logged_steps_is_caught_on_the_device_and_never_checkpointed(tmp_path, capsys):
    """The NaN fault at step 3 while only every 20th step is logged and every step is saved: the run ends
    at the save of step 3 with one line naming step 3; the checkpoints on disk are steps 1 and 2, finite."""
    cfg = tiny("single", "train.steps=6", "logging.every=20", "checkpoint.every=1", "checkpoint.keep=0",
               "checkpoint.async_save=false", "faults.nan_step=3", "faults.nan_layer=0", "monitor.enabled=false")
    trainer = pj.Trainer(cfg, tmp_path)
    with pytest.raises(pj.RunAborted, match="non-finite at step 3"):
        trainer.run()
    trainer.close()
    assert trainer.step_count == 3
    assert steps_on_disk(tmp_path) == [1, 2]
    resumed = pj.Trainer(cfg.replace(faults={"nan_step": 0}), tmp_path, resume=True)
    assert resumed.step_count == 2 and state_is_finite(resumed.state)
    resumed.close()


@pytest.mark.slow
def test_a_diverging_run_with_a_huge_learning_rate_writes_only_finite_checkpoints(tmp_path):
    cfg = tiny("single", "train.steps=30", "logging.every=20", "checkpoint.every=1", "checkpoint.keep=0",
               "checkpoint.async_save=false", "optimizer.lr=1e30", "optimizer.warmup_steps=0",
               "optimizer.grad_clip=0", "monitor.enabled=false")
    trainer = pj.Trainer(cfg, tmp_path)
    with pytest.raises(pj.RunAborted, match="non-finite"):
        trainer.run()
    trainer.close()
    saved = steps_on_disk(tmp_path)
    assert saved and saved[-1] < trainer.step_count
    resumed = pj.Trainer(cfg, tmp_path, resume=True)
    assert resumed.step_count == saved[-1] and state_is_finite(resumed.state)
    resumed.close()


def test_a_non_finite_checkpoint_on_disk_is_skipped_on_resume(tmp_path, capsys):
    """A NaN state written behind the guard's back (an older version, by hand) is unusable: `ckpt info` says
    so (exit 1), and --resume says so in one line and falls back to the older finite step."""
    cfg = tiny("single", "train.steps=2", "checkpoint.every=1", "checkpoint.async_save=false", "checkpoint.keep=0")
    trainer = pj.Trainer(cfg, tmp_path)
    trainer.run()
    poisoned = trainer.state.replace(step=trainer.state.step + 1,
                                     params={**trainer.state.params,
                                             "embed": trainer.state.params["embed"] * np.float32(np.nan)})
    raw = Checkpointer(tmp_path / "checkpoints", cfg)
    raw.save(poisoned, {})
    raw.close()
    trainer.close()
    assert steps_on_disk(tmp_path) == [1, 2, 3]
    capsys.readouterr()
    # `ckpt info` applies the same rule: the NaN step is not usable (exit 1, says why), the finite one is
    assert main(["ckpt", "info", str(tmp_path / "checkpoints" / "3")]) == 1
    out = capsys.readouterr().out
    assert "valid: NO, 1 array(s) hold NaN or infinite values (params/embed)" in out and "--resume skips" in out
    assert main(["ckpt", "info", str(tmp_path / "checkpoints" / "2")]) == 0
    assert "every float finite" in capsys.readouterr().out
    resumed = pj.Trainer(cfg, tmp_path, resume=True)
    assert resumed.step_count == 2
    assert "holds NaN or infinite values" in capsys.readouterr().out
    resumed.close()
