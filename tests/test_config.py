"""Bad input stops the run before any work, with one message naming field, value and what is valid."""

from __future__ import annotations

import pytest

from helpers import MESHES, preset
from picotron_jax.cli import main
from picotron_jax.config import load_config
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    return str(info.value)


def check(overrides, devices=8, name="dp8"):
    return error_of(lambda: validate(preset(name, *overrides), devices))


def test_presets_load_and_validate():
    for path in MESHES.glob("*.yaml"):
        cfg = load_config(path)
        validate(cfg, cfg.mesh.num_devices or 8)


def test_overrides_are_typed():
    cfg = load_config(MESHES / "single.yaml", ["train.steps=7", "optimizer.lr=1e-4", "model.tie_embeddings=true"])
    assert (cfg.train.steps, cfg.optimizer.lr, cfg.model.tie_embeddings) == (7, 1e-4, True)


def test_unknown_key_names_it_and_lists_valid_ones():
    msg = error_of(load_config, None, ["train.stepz=3"])
    assert "train.stepz" in msg and "steps" in msg
    assert "unknown config key 'bogus'" in error_of(load_config, None, ["bogus.x=1"]).replace("bogus.x", "bogus")


def test_wrong_type_names_field_value_and_type():
    msg = error_of(load_config, None, ["train.steps=many"])
    assert "train.steps" in msg and "'many'" in msg and "int" in msg


def test_override_syntax():
    assert "section.key=value" in error_of(load_config, None, ["train.steps"])


def test_missing_config_file():
    assert "does-not-exist.yaml" in error_of(load_config, "does-not-exist.yaml")


def test_heads_not_divisible_by_tensor():
    msg = check(["model.num_heads=6", "model.num_kv_heads=6", "model.hidden_size=96", "mesh.tensor=4", "mesh.data=2"])
    assert "model.num_heads" in msg and "6" in msg and "mesh.tensor = 4" in msg


def test_kv_heads_neither_divide_nor_divisible():
    msg = check(["model.num_heads=12", "model.num_kv_heads=3", "model.hidden_size=96", "mesh.tensor=2", "mesh.data=4"])
    assert "model.num_kv_heads" in msg and "3" in msg


def test_mesh_product_must_equal_device_count():
    msg = check(["mesh.data=4", "mesh.tensor=4"])
    assert "16 devices" in msg and "uses 8" in msg


def test_fill_axis_must_divide():
    msg = check(["mesh.data=-1", "mesh.tensor=3"])
    assert "mesh.data=-1" in msg and "3" in msg and "8" in msg


def test_two_fill_axes():
    assert "only one mesh axis may be -1" in check(["mesh.data=-1", "mesh.tensor=-1"])


def test_batch_not_divisible_by_data_times_expert():
    msg = check(["train.global_batch=12"])
    assert "train.global_batch" in msg and "12" in msg and "mesh.data x mesh.expert = 8" in msg


def test_batch_with_accumulation():
    msg = check(["train.global_batch=16", "train.grad_accum=4"])
    assert "4 microbatch" in msg and "4 sequences" in msg


def test_zero_stage_values():
    msg = check(["train.zero_stage=2"])
    assert "train.zero_stage" in msg and "0 (plain DP)" in msg and "3" in msg


def test_vocab_not_divisible_by_tensor():
    msg = check(["model.vocab_size=250", "mesh.tensor=8", "mesh.data=1"])
    assert "model.vocab_size" in msg and "250" in msg and "256" in msg


def test_too_many_devices_requested():
    from picotron_jax.mesh import run_devices

    msg = error_of(run_devices, preset("single", "mesh.num_devices=9").mesh)
    assert "mesh.num_devices" in msg and "9" in msg and "8 visible" in msg


def test_cli_user_error_exit_code_and_stderr(capsys, tmp_path):
    code = main(["train", "--config", str(MESHES / "dp8.yaml"), "--run-dir", str(tmp_path / "run"),
                 "mesh.tensor=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "mesh" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a failed validation must not leave a run directory"


def test_cli_missing_data_exit_code(capsys, tmp_path):
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(tmp_path / "run"),
                 f"data.source={tmp_path / 'nope.txt'}"])
    assert code == 2
    assert "nope.txt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_vocab_smaller_than_tokenizer(capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 500)
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(tmp_path / "run"),
                 f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=128"])
    err = capsys.readouterr().err
    assert code == 2 and "model.vocab_size" in err and "128" in err and "256" in err


@pytest.mark.parametrize("name, overrides, field", [
    ("moe-single", ["precision.mode=fp16"], "precision.mode"),  # experts run without loss scaling
    ("moe-single", ["memory.remat=full:2,none:2"], "memory.remat"),  # the mixed stack takes one policy
    # MoE in pipeline stages: every stage holds the same layer structure
    ("pp2-afab", ["moe.num_experts=8", "moe.first_dense_layers=2"], "moe.first_dense_layers"),
    ("pp2-afab", ["moe.num_experts=8", "moe.every_n_layers=4"], "moe.every_n_layers"),
])
def test_feature_combinations_that_do_not_compose_are_refused(name, overrides, field):
    with pytest.raises(UserError, match=f"config field '{field}'"):
        validate(preset(name, *overrides), 8 if name.startswith("pp") else 1)


def test_remat_none_in_segments_is_none():
    validate(preset("moe-single", "memory.remat=none:4"), 1)
    validate(preset("pp2-afab", "memory.remat=none:2,none:2"), 8)


def test_planner_offers_moe_models_and_pipelines_only_valid_candidates():
    from picotron_jax.memory.planner import candidate_space

    policies = {r for r, _, _ in candidate_space(preset("single"), 1)}
    assert len(policies) > 1
    # MoE and pipelines take every uniform remat policy (the one model path); pipelines no grad_accum
    assert {r for r, _, _ in candidate_space(preset("moe-single"), 1)} == policies
    assert {(r, m) for r, m, _ in candidate_space(preset("pp4-1f1b"), 8)} == {(r, 1) for r in policies}
