"""Stock Orbax `CheckpointManager.restore(step)` on a picotron_jax checkpoint, as README's "Without picotron_jax"
says: with no restore arguments it works on the device count that saved the step and fails on another one;
with numpy restore arguments it works on any count. Each read runs in a process without picotron_jax."""
import os
import subprocess
import sys

import numpy as np
import pytest

READ = """
import os, sys, jax, numpy as np, orbax.checkpoint as ocp
mgr = ocp.CheckpointManager(os.path.abspath(sys.argv[1]))
step = mgr.latest_step()
try:
    plain = mgr.restore(step)["state"]["params"]["layers"]["wq"]
    print("plain ok", np.asarray(plain).shape)
except ValueError as e:
    print("plain failed:", str(e).splitlines()[0])
tree = ocp.PyTreeCheckpointer().metadata(os.path.join(mgr.directory, str(step), "state")).item_metadata.tree
numpy_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=tree, restore_args=numpy_args)))
np.save(sys.argv[2], state["state"]["params"]["layers"]["wq"])
assert not [m for m in sys.modules if m.startswith("picotron_jax")]
"""


def read(ckpt_dir, devices: int, out):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run([sys.executable, "-c", READ, str(ckpt_dir), str(out)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # default suite under 20 minutes
def test_stock_checkpoint_manager_restores_only_on_the_saving_device_count_unless_given_numpy_args(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run([sys.executable, "-m", "picotron_jax.cli", "train", "-c", "meshes/single.yaml",
                          "mesh.num_devices=2", "mesh.data=2", "train.steps=2", "checkpoint.every=2",
                          "model.num_layers=2", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints"
    same = read(ckpt, 2, tmp_path / "wq2.npy")
    other = read(ckpt, 1, tmp_path / "wq1.npy")
    assert "plain ok" in same, same
    assert "plain failed: sharding passed to deserialization should be specified" in other, other
    np.testing.assert_array_equal(np.load(tmp_path / "wq1.npy"), np.load(tmp_path / "wq2.npy"))
