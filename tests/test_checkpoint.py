"""Checkpoints: bitwise resume, stop_at_step, keep policy, reshard onto another mesh, fallback past a
damaged checkpoint, compression level, leftovers of a killed save, inspector, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorstore as ts

from helpers import MESHES, preset, setup
from picotron_jax.checkpoint.hf import export_to_hf
from picotron_jax.checkpoint.inspect import list_steps, step_info
from picotron_jax.checkpoint.manager import Checkpointer
from picotron_jax.checkpoint.restore import restore_train_state
from picotron_jax.cli import main
from picotron_jax.errors import UserError
from picotron_jax.train.state import init_train_state


def logged_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def steps_on_disk(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def damage(step_dir: Path) -> None:
    """Flip bytes in the middle of the largest array data file (a silent disk error)."""
    data = max((f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)),
               key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    data.write_bytes(bytes(raw))


SCHEDULE = ["train.seq_len=32", "logging.every=1", "optimizer.warmup_steps=2", "optimizer.decay_steps=4",
            "train.steps=6", "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.keep_every=4",
            "checkpoint.require_lossless=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """On one device: a straight 6-step run, and a run stopped at step 3 (as if its time ran out, keeping 2
    checkpoints), whose checkpoints are also copied aside before it is resumed to step 6 (keeping 1)."""
    tmp = tmp_path_factory.mktemp("runs")
    common = ["--config", str(MESHES / "single.yaml"), *SCHEDULE]
    assert main(["train", "--run-dir", str(tmp / "straight"), *common]) == 0
    assert main(["train", "--run-dir", str(tmp / "split"), *common, "train.stop_at_step=3", "checkpoint.keep=2"]) == 0
    stopped_at = steps_on_disk(tmp / "split" / "checkpoints")
    shutil.copytree(tmp / "split" / "checkpoints", tmp / "moved" / "checkpoints")
    assert main(["train", "--run-dir", str(tmp / "split"), "--resume", *common]) == 0
    return tmp, stopped_at


def test_stop_at_step_then_resume_is_bitwise_identical_and_keeps_the_policy(runs):
    """Stopped at 3 and resumed to 6: the same losses as never stopping, bit for bit. keep=1 plus
    keep_every=4 leaves steps 4 (kept for good) and 6 (newest); saves are async and logged."""
    tmp, stopped_at = runs
    assert stopped_at == [2, 3]  # the stop point is saved although 3 % checkpoint.every != 0
    a, b = logged_losses(tmp / "straight"), logged_losses(tmp / "split")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bitwise: same mesh, same batches
    assert steps_on_disk(tmp / "straight" / "checkpoints") == steps_on_disk(tmp / "split" / "checkpoints") == [4, 6]
    events = [json.loads(line) for line in (tmp / "straight" / "checkpoints.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [2, 4, 6] and all(e["async"] and e["blocked_s"] >= 0 for e in events)
    assert all(0 < e["bytes_on_disk"] for e in events)


def test_resume_onto_another_mesh_falls_back_past_a_damaged_checkpoint(runs, capsys):
    """Saved on one device at steps 2 and 3; step 3 damaged on disk; --resume on data=4 x tensor=2 says so
    in one line, restores step 2 resharded, and continues within fp32 tolerance of the straight run."""
    tmp, _ = runs
    damage(tmp / "moved" / "checkpoints" / "3")
    capsys.readouterr()
    assert main(["train", "--config", str(MESHES / "tp2-dp4.yaml"), "--run-dir", str(tmp / "moved"), "--resume",
                 *SCHEDULE]) == 0
    out = capsys.readouterr().out
    assert "checkpoints/3 is unusable" in out and "falling back to step 2" in out and "at step 2" in out
    a, b = logged_losses(tmp / "straight"), logged_losses(tmp / "moved")
    assert sorted(b) == [3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in (3, 4, 5, 6)], [a[s] for s in (3, 4, 5, 6)], rtol=1e-5)


def test_resume_from_one_device_onto_a_pipeline(runs):
    """--resume-from a one-device checkpoint onto pipe=4 x data=2 (1F1B): the stacked [L, ...] layer arrays
    are resharded over `pipe` on load, and the losses continue within fp32 tolerance."""
    tmp, _ = runs
    assert main(["train", "--config", str(MESHES / "pp4-1f1b.yaml"), "--run-dir", str(tmp / "piped"),
                 "--resume-from", str(tmp / "straight" / "checkpoints" / "4"), *SCHEDULE]) == 0
    a, b = logged_losses(tmp / "straight"), logged_losses(tmp / "piped")
    assert sorted(b) == [5, 6]
    np.testing.assert_allclose([b[5], b[6]], [a[5], a[6]], rtol=1e-5)


# ----------------------------------------------------------------- the Checkpointer without training


@pytest.fixture(scope="module")
def small_state():
    cfg = preset("single", "checkpoint.every=1", "checkpoint.keep=0")
    _, st = setup(cfg)
    return cfg, st, init_train_state(cfg, st)


def save_steps(cfg, state, folder: Path, steps, **overrides):
    for key, value in overrides.items():
        setattr(cfg.checkpoint, key, value)
    ckpt = Checkpointer(folder, cfg, say=lambda _m: None)
    for s in steps:
        ckpt.save(state.replace(step=state.step + s), {"mesh": "single"})
    ckpt.close()


def assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Orbax leaves the other reads of a failed restore to an event loop it has closed: harmless noise
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_and_flipped_checkpoints_are_caught_and_skipped(small_state, tmp_path):
    cfg, st, state = small_state
    save_steps(cfg, state, tmp_path, [1, 2, 3], compression_level=0, async_save=True)
    damage(tmp_path / "3")  # uncompressed: the flipped bytes would decode fine, the chunk's CRC32C does not
    data = max((tmp_path / "2" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])  # truncated
    said = []
    restored, meta, where = restore_train_state(str(tmp_path), st.abstract, st.shardings, cfg, said.append)
    assert meta["step"] == int(restored.step) == 1 and where.endswith("/1")
    assert len(said) == 2 and all("arrays cannot be read" in line for line in said), said
    assert "Digest mismatch" in said[0] and said[0].endswith("falling back to step 2")
    assert_same_state(restored.params, state.params)
    assert not step_info(str(tmp_path / "3"))["valid"] and step_info(str(tmp_path / "1"))["valid"]
    with pytest.raises(UserError, match="checkpoint .*/3 is unusable"):  # named explicitly: no fallback
        restore_train_state(str(tmp_path / "3"), st.abstract, st.shardings, cfg)


def test_leftover_of_a_killed_save_is_ignored_and_removed(small_state, tmp_path):
    cfg, st, state = small_state
    save_steps(cfg, state, tmp_path, [1, 2], compression_level=3, async_save=False)
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")  # as if killed while writing step 3
    assert [r["step"] for r in list_steps(str(tmp_path))] == [1, 2]
    said = []
    Checkpointer(tmp_path, cfg, say=said.append).close()
    assert said == [f"checkpoint: removing {tmp_path}/3.orbax-checkpoint-tmp (a save that never completed)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def zstd_levels(step_dir: Path) -> set:
    """The zstd level recorded in every array's zarr.json inside the OCDBT database (each chunk's codec
    chain also ends with a CRC32C)."""
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}).result()
    levels = set()
    for key in kv.list().result():
        if key.endswith(b"zarr.json"):
            codecs = json.loads(kv.read(key).result().value)["codecs"][0]["configuration"]["codecs"]
            assert codecs[-1]["name"] == "crc32c"
            levels |= {c["configuration"]["level"] for c in codecs if c["name"] == "zstd"} or {0}
    return levels


def test_compression_level_is_configurable_and_restores_the_same(small_state, tmp_path):
    cfg, st, state = small_state
    sizes = {}
    for level in (0, 1, 19):
        save_steps(cfg, state, tmp_path / str(level), [1], compression_level=level, async_save=True, codec="zstd")
        assert zstd_levels(tmp_path / str(level) / "1") == {level}
        sizes[level] = list_steps(str(tmp_path / str(level)))[0]["bytes_on_disk"]
        restored, meta, _ = restore_train_state(str(tmp_path / str(level)), st.abstract, st.shardings, cfg)
        assert_same_state(restored, state.replace(step=state.step + 1))
        assert {k: meta["compression"][k] for k in ("codec", "level")} == {"codec": "zstd" if level else "none",
                                                                          "level": level}
    raw = meta["raw_bytes"]
    # fresh Adam moments are zeros: they compress well; random weights barely (any level)
    assert max(sizes[1], sizes[19]) < 0.5 * sizes[0] and sizes[0] >= raw


def test_clear_errors_for_unknown_step_empty_folder_and_another_model(small_state, tmp_path, capsys):
    cfg, st, state = small_state
    save_steps(cfg, state, tmp_path / "ck", [1, 2], compression_level=3, async_save=True, codec="zstd")
    with pytest.raises(UserError, match=r"no checkpoint at step 7 in .*ck \(steps there: 1, 2\)"):
        restore_train_state(str(tmp_path / "ck" / "7"), st.abstract, st.shardings, cfg)
    with pytest.raises(UserError, match="no checkpoint in .*empty"):
        restore_train_state(str(tmp_path / "empty"), st.abstract, st.shardings, cfg)
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(tmp_path / "run"),
                 "--resume-from", str(tmp_path / "ck"), "model.hidden_size=64", "model.num_layers=2"])
    err = capsys.readouterr().err
    assert code == 2 and "saved with another model" in err
    assert "model.hidden_size: 128 in the checkpoint, 64 in this run" in err and "model.num_layers: 4" in err
    assert main(["ckpt", "ls", str(tmp_path / "ck")]) == 0
    table = capsys.readouterr().out
    assert "zstd:3" in table and table.count("metadata ok") == 2
    assert main(["ckpt", "info", str(tmp_path / "ck")]) == 0
    assert "step 2" in capsys.readouterr().out
    assert main(["ckpt", "info", str(tmp_path / "ck" / "9")]) == 2
    assert "no checkpoint at step 9" in capsys.readouterr().err


def test_checkpoint_config_errors_name_the_field():
    from picotron_jax.config_checks import validate

    for overrides, field in ((["checkpoint.every=3", "checkpoint.keep_every=4"], "checkpoint.keep_every"),
                             (["checkpoint.compression_level=30"], "checkpoint.compression_level"),
                             (["train.stop_at_step=-1"], "train.stop_at_step")):
        with pytest.raises(UserError, match=field):
            validate(preset("single", *overrides), 1)
    with pytest.raises(UserError, match="hdfs:// is not supported.*mount"):
        Checkpointer("hdfs://namenode/ckpt", preset("single"))


def test_resume_with_other_arrays_or_moe_placement_is_refused_by_name(small_state, tmp_path):
    """A checkpoint whose arrays differ from this run's state (fp16 adds a loss scale) or whose MoE layers sit
    elsewhere is a settings error, named, not a 'damaged checkpoint' that sends --resume falling back."""
    cfg, st, state = small_state
    save_steps(cfg, state, tmp_path / "ck", [1])
    cfg16 = preset("single", "precision.mode=fp16")
    _, st16 = setup(cfg16)
    with pytest.raises(UserError, match=r"other arrays .*only in this run: loss_scale/"):
        restore_train_state(str(tmp_path / "ck"), st16.abstract, st16.shardings, cfg16)
    moe_a = preset("moe-single", "moe.first_dense_layers=0", "moe.every_n_layers=2")
    moe_b = preset("moe-single", "moe.first_dense_layers=2", "moe.every_n_layers=1")
    _, st_a = setup(moe_a)
    save_steps(moe_a, init_train_state(moe_a, st_a), tmp_path / "moe", [1])
    _, st_b = setup(moe_b)
    with pytest.raises(UserError, match=r"moe.first_dense_layers: 0 in the checkpoint, 2 in this run"):
        restore_train_state(str(tmp_path / "moe"), st_b.abstract, st_b.shardings, moe_b)
    with pytest.raises(UserError, match="Mixture-of-Experts model .*dense Llama folders only"):
        export_to_hf(tmp_path / "moe" / "1", tmp_path / "hf")
