"""Hugging Face round trip: a random `transformers` LlamaForCausalLM -> our train state (`--from hf`) gives
the same logits; our checkpoint -> `export --to hf` -> LlamaForCausalLM gives our logits back."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from helpers import preset, setup  # noqa: E402
from picotron_jax.checkpoint.hf import apply_hf_model_config, train_state_from_hf  # noqa: E402
from picotron_jax.checkpoint.manager import Checkpointer  # noqa: E402
from picotron_jax.cli import main  # noqa: E402
from picotron_jax.errors import UserError  # noqa: E402
from picotron_jax.models.llama import Llama  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 11))


def hf_model(tmp_path, tie: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                      rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at one: make them random so a transposed/misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def our_logits(cfg, params) -> np.ndarray:
    graphdef, state = nnx.split(Llama(cfg.model, rngs=nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, params)
    return np.asarray(nnx.merge(graphdef, state)(TOKENS))


@pytest.mark.parametrize("tie", [False, True])
def test_hf_import_and_export_give_transformers_logits(tmp_path, tie, capsys):
    reference = hf_model(tmp_path / "hf", tie)
    cfg = preset("single", "model.num_layers=7")  # the HF folder's architecture replaces the preset's
    apply_hf_model_config(["hf", str(tmp_path / "hf")], cfg)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.tie_embeddings) == (2, 32, tie)
    _, st = setup(cfg)
    state = train_state_from_hf(str(tmp_path / "hf"), cfg, st)
    assert int(state.step) == 0
    assert cfg.model.rope_theta == 5000.0
    np.testing.assert_allclose(our_logits(cfg, state.params), hf_logits(reference), rtol=1e-5, atol=1e-5)

    ckpt = Checkpointer(tmp_path / "ckpt", cfg, say=lambda _m: None)
    ckpt.save(state, {"mesh": "single"})
    ckpt.close()
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 3e-2)):
        out = tmp_path / f"export-{dtype}"
        assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--to", "hf", str(out), "--dtype", dtype]) == 0
        exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
        np.testing.assert_allclose(hf_logits(exported), hf_logits(reference), atol=tol)
    assert "wrote" in capsys.readouterr().out


def test_unsupported_hf_models_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "gelu",
                                                      "rope_scaling": {"type": "yarn"}, "num_attention_heads": 4}))
    with pytest.raises(UserError, match="hidden_act = 'gelu'.*|rope_scaling"):
        apply_hf_model_config(["hf", str(tmp_path)], preset("single"))
    with pytest.raises(UserError, match="no config.json"):
        apply_hf_model_config(["hf", str(tmp_path / "missing")], preset("single"))
    with pytest.raises(UserError, match="only supported source format is 'hf'"):
        apply_hf_model_config(["gguf", str(tmp_path)], preset("single"))
