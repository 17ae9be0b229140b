"""Text generation: KV-cache decoding equals re-running the full forward per token, on one device and on
tensor x data parallel; both tokenizers decode; the command's bad inputs get one line each."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import picotron_jax as pj
from helpers import MESHES
from picotron_jax.cli import main
from picotron_jax.config import DataConfig
from picotron_jax.data import load_tokenizer, train_bpe_tokenizer
from picotron_jax.generate import Sampling, generate_tokens
from picotron_jax.parallel.ops import MeshOps
from test_api import TINY, tiny

PROMPT = "def main(args):\n    "


def greedy_by_full_forward(trainer, prompt_ids: list[int], n: int) -> list[int]:
    """The reference: the whole sequence through the training forward (no cache) for every new token."""
    model = nnx.merge(trainer.built.setup.spec.graphdef, nnx.State(trainer.params))
    ops = MeshOps(trainer.built.rules)
    logits_fn = jax.jit(lambda tokens: model(tokens, ops)[:, -1])
    tokens = list(prompt_ids)
    for _ in range(n):
        tokens.append(int(jnp.argmax(logits_fn(jnp.asarray([tokens], jnp.int32)), axis=-1)[0]))
    return tokens[len(prompt_ids):]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained a little on one device (peaked next-token distributions), and its run dir."""
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    trainer = pj.Trainer(tiny("single", "train.seq_len=48", "train.steps=40", "optimizer.lr=1e-2",
                              "checkpoint.every=40"), run_dir)
    trainer.run()
    trainer.close()
    return trainer, run_dir


@pytest.mark.parametrize("layout", ["single", "tp2-dp4"])
def test_greedy_kv_cache_decoding_equals_the_full_forward(trained, layout):
    trainer = trained[0] if layout == "single" else pj.Trainer.restore(trained[1], trained[0].cfg.replace(
        mesh={"num_devices": 0, "data": 4, "tensor": 2}), run_dir=None)
    ids = load_tokenizer("byte").encode(PROMPT)
    cached = generate_tokens(trainer.cfg, trainer.built.rules, trainer.params, ids, Sampling(max_new_tokens=16))
    assert cached == greedy_by_full_forward(trainer, ids, 16)
    assert cached == generate_tokens(trainer.cfg, trainer.built.rules, trainer.params, ids,
                                     Sampling(max_new_tokens=16))  # deterministic
    text = trainer.generate(PROMPT, max_new_tokens=16)
    assert text == load_tokenizer("byte").decode(cached)


def test_sampling_repeats_per_seed_and_top_k_limits_the_choice(trained):
    trainer = trained[0]
    a = trainer.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=5, seed=1)
    assert a == trainer.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=5, seed=1)
    seeds = {trainer.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=s) for s in range(4)}
    assert len(seeds) > 1
    assert trainer.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == trainer.generate(
        PROMPT, max_new_tokens=12)  # top-1 sampling is greedy


def test_tokenizer_json_models_decode_back_to_text(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    bpe = train_bpe_tokenizer(DataConfig(source=str(corpus)), 300, tmp_path / "tokenizer.json")
    trainer = pj.Trainer(tiny("single", f"data.source={corpus}", f"data.tokenizer={bpe}", "model.vocab_size=300",
                              f"data.cache_dir={tmp_path / 'cache'}", "train.steps=20", "optimizer.lr=1e-2"))
    trainer.run()
    text = trainer.generate("the quick", max_new_tokens=6)
    ids = load_tokenizer(str(bpe)).encode(text)
    assert isinstance(text, str) and len(ids) >= 1 and load_tokenizer(str(bpe)).decode(ids) == text


def test_generate_command_prints_the_continuation(trained, capsys):
    trainer, run_dir = trained
    before = sorted(os.listdir(run_dir))
    assert main(["generate", "--run-dir", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out == PROMPT + trainer.generate(PROMPT, max_new_tokens=16) + "\n"
    assert main(["generate", "--checkpoint", str(run_dir / "checkpoints"), "--prompt", PROMPT,
                 "--max-new-tokens", "16", "mesh.tensor=2", "mesh.data=4", "mesh.num_devices=0"]) == 0
    assert capsys.readouterr().out == out
    assert sorted(os.listdir(run_dir)) == before  # nothing written


def test_generate_bad_inputs_get_one_line_each(trained, tmp_path, capsys):
    _, run_dir = trained
    empty = tmp_path / "empty"
    assert main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(empty), *TINY,
                 "train.steps=1"]) == 0  # a run that saved no checkpoint
    cases = [
        (["--run-dir", str(empty), "--prompt", "x", "--max-new-tokens", "4"], "no checkpoint in"),
        (["--run-dir", str(tmp_path / "nowhere"), "--prompt", "x"], "no config.yaml there"),
        (["--run-dir", str(run_dir), "--prompt", "x" * 60], "the prompt has 60 tokens"),
        (["--run-dir", str(run_dir), "--prompt", "x", "--top-k", "0"], "top_k = 0: must be >= 1"),
        (["--run-dir", str(run_dir), "--prompt", "x", "--temperature", "-1"], "temperature = -1.0: must be >= 0"),
        (["--run-dir", str(run_dir), "--prompt", "", "--max-new-tokens", "4"], "the prompt is empty"),
    ]
    for args, message in cases:
        listing = sorted(os.listdir(run_dir))
        assert main(["generate", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert sorted(os.listdir(run_dir)) == listing
    assert "generate.temperature" in str(pytest.raises(pj.UserError, tiny("single", "generate.temperature=-1")
                                                       .validate).value)
