"""Newcomer gaps: --version, the Hugging Face export's tokenizer and file mode, the mesh hint's real cause."""

from __future__ import annotations

import stat

import pytest

import picotron_jax as pj
from picotron_jax.checkpoint.hf import export_to_hf
from picotron_jax.cli import main
from picotron_jax.data.tokenizer import ByteTokenizer
from picotron_jax.errors import UserError
from test_api import tiny


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"picotron-jax {pj.__version__}"


def test_mesh_hint_names_mesh_num_devices_when_the_preset_limits_the_devices():
    cfg = pj.load_config("single", ["mesh.data=2"])  # single.yaml: mesh.num_devices: 1, 8 devices visible
    with pytest.raises(UserError, match=r"'mesh.num_devices' = 1 limits the run to 1; set mesh.num_devices=2"):
        cfg.validate()


def test_export_writes_a_byte_tokenizer_autotokenizer_loads_and_a_readable_safetensors(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    trainer = pj.Trainer(tiny("single", "train.steps=1", "checkpoint.async_save=false"), tmp_path / "run")
    trainer.run()
    trainer.save()
    trainer.close()
    caplog.clear()
    out = export_to_hf(tmp_path / "run" / "checkpoints" / "1", tmp_path / "hf")
    assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]  # no absl warning per read
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "héllo wörld\n  x"
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text) and tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == 0
