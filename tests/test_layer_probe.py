"""The monitor's per-layer activation statistics (models/llama.py `LayerProbe`, train/monitor_stats.py):
each decoder layer's output RMS and its largest causal attention logit, recorded by the layers during the
step's own forward pass on every `monitor.layer_every`-th step.

They equal a by-hand computation (full score matrices, explicit causal mask) on one device, and the same
numbers come out of every layout: data / ZeRO-3 with gradient accumulation, tensor, context (zigzag
columns), the pipeline schedules (with tensor, with context), MoE with expert parallelism. A NaN injected into one
layer's output through the fault injector shows in that layer's RMS and not in the layers before it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import preset, setup, synthetic_batch
from picotron_jax.models import llama
from picotron_jax.models.attention import causal_logit_max, rotary_tables
from picotron_jax.models.ops import LOCAL_OPS
from picotron_jax.train.faults import InStepFaults
from picotron_jax.train.state import init_train_state
from picotron_jax.train.step import build_train_step

FIELDS = ("layer_act_rms", "layer_attn_logit_max")


def probe_step(name: str, *overrides: str, steps: int = 1) -> list[dict]:
    """The probe's outputs (host numpy) of each of `steps` steps of preset `name`, per-layer every step."""
    cfg = preset(name, "monitor.layer_every=1", *overrides)
    rules, st = setup(cfg)
    state = init_train_state(cfg, st)
    step = build_train_step(cfg, rules, st)
    faults = InStepFaults(cfg.faults) if cfg.faults.in_step else None  # the fault injector's in-step faults
    outs = []
    for i in range(steps):
        extra = () if faults is None else (faults.flags(i + 1),)
        state, metrics = step(state, synthetic_batch(cfg, i, rules), *extra)
        outs.append({k: np.asarray(v) for k, v in metrics.items() if k in (*FIELDS, "layer_act_step", "loss")})
    return outs


def by_hand(name: str) -> dict[str, np.ndarray]:
    """Each layer's output RMS and largest causal logit, from the initial parameters and batch 0, in numpy
    (the layers run one by one; the scores are the whole [T, T] matrix per head, masked below the diagonal)."""
    cfg = preset(name)
    rules, st = setup(cfg)
    params = jax.device_get(init_train_state(cfg, st).params)
    tokens = np.asarray(synthetic_batch(cfg, 0)["inputs"])
    mc = cfg.model
    x = jnp.asarray(params["embed"])[tokens]
    cos, sin = rotary_tables(jnp.arange(tokens.shape[1]), mc.resolved_head_dim, mc.rope_theta)
    rms, logit = [], []
    for layer in range(mc.num_layers):
        p = {k: jnp.asarray(v[layer]) for k, v in params["layers"].items()}
        q, k, _ = llama.attention_inputs(p, x, cos, sin, mc, LOCAL_OPS)
        q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
        R = q.shape[2] // k.shape[2]
        scores = np.einsum("bthd,bshd->bhts", q, np.repeat(k, R, axis=2)) / np.sqrt(q.shape[-1])
        T = scores.shape[-1]
        logit.append(scores[..., np.tril(np.ones((T, T), bool))].max())
        x = llama.decoder_block(p, x, cos, sin, mc, LOCAL_OPS)
        rms.append(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))
    return {"layer_act_rms": np.asarray(rms), "layer_attn_logit_max": np.asarray(logit)}


def test_the_blocked_logit_max_equals_the_whole_score_matrix_in_any_column_order():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 16, 4, 8)).astype(np.float32), rng.normal(size=(2, 16, 2, 8)).astype(np.float32)
    pos = rng.permutation(16)  # the columns' positions (zigzag-like: any order)
    scores = np.einsum("bthd,bshd->bhts", q, np.repeat(k, 2, axis=2)) / np.sqrt(8)
    expected = scores[..., pos[:, None] >= pos[None, :]].max()
    for block in (1, 4, 16):  # 16 keys in 16, 4 and 1 blocks
        got = causal_logit_max(jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos), key_block=block)
        assert np.isclose(float(got), expected, rtol=1e-5), (block, float(got), expected)
    assert float(causal_logit_max(jnp.asarray(q), jnp.asarray(k))) == pytest.approx(
        scores[..., np.tril(np.ones((16, 16), bool))].max(), rel=1e-5)  # default: the natural order
    # inside a shard_map (the pipeline's stages; long sequences visit their keys in blocks): the loop's
    # running max is typed like the scores, varying over the mesh axes
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    blocked = jax.shard_map(lambda q, k: jax.lax.pmax(causal_logit_max(q, k, key_block=4), "data"), mesh=mesh,
                            in_specs=(jax.P("data"), jax.P("data")), out_specs=jax.P())
    assert float(blocked(jnp.asarray(q), jnp.asarray(k))) == pytest.approx(
        scores[..., np.tril(np.ones((16, 16), bool))].max(), rel=1e-5)


@pytest.fixture(scope="module")
def single():
    return probe_step("single")[0]


def test_the_probe_equals_a_by_hand_computation_of_every_layer(single):
    expected = by_hand("single")
    for field in FIELDS:
        np.testing.assert_allclose(single[field], expected[field], rtol=2e-5, err_msg=field)
    assert len(set(np.round(single["layer_act_rms"], 6))) == len(single["layer_act_rms"])  # really per layer


@pytest.mark.parametrize("name, overrides", [
    ("zero3-dp8", ("train.grad_accum=2",)),
    ("tp2-dp4", ()),
    ("cp4-dp2", ()),  # zigzag columns: causality from the positions
    ("pp2-cp2-dp2", ("mesh.data=1", "mesh.tensor=2")),  # stages x zigzag columns x heads
])
def test_every_layout_gives_the_single_device_statistics(single, name, overrides):
    out = probe_step(name, *overrides)[0]
    assert np.isclose(out["loss"], single["loss"], rtol=1e-5)
    for field in FIELDS:
        np.testing.assert_allclose(out[field], single[field], rtol=1e-5, err_msg=f"{name}: {field}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp4-1f1b", "pp2-interleaved", "pp2-afab", "pp2-dp2-tp2"])
def test_every_pipeline_schedule_gives_the_single_device_statistics(single, name):
    out = probe_step(name)[0]
    for field in FIELDS:
        np.testing.assert_allclose(out[field], single[field], rtol=1e-5, err_msg=f"{name}: {field}")


@pytest.mark.slow
def test_moe_with_expert_and_tensor_parallelism_gives_the_single_device_statistics():
    ref, out = probe_step("moe-single")[0], probe_step("moe-ep4-tp2")[0]
    for field in FIELDS:
        np.testing.assert_allclose(out[field], ref[field], rtol=1e-5, err_msg=field)


def test_a_nan_injected_into_one_layer_shows_in_its_rms_and_not_before_it_and_only_probe_steps_record():
    out = probe_step("single", "faults.nan_step=2", "faults.nan_layer=2", "faults.nan_site=forward",
                     "monitor.layer_every=2", steps=2)
    assert not out[0]["layer_act_step"] and out[1]["layer_act_step"]
    assert np.all(out[0]["layer_act_rms"] == 0)  # not measured on a step that is not a probe step
    rms = out[1]["layer_act_rms"]
    assert np.all(np.isfinite(rms[:2])) and np.all(np.isnan(rms[2:])), rms


def test_the_fields_reach_metrics_jsonl_on_per_layer_steps_only(tmp_path):
    import picotron_jax as pj

    cfg = pj.load_config("single", ["train.steps=4", "train.seq_len=32", "monitor.layer_every=2", "logging.every=1",
                                    "logging.progress=false"])
    with pj.Trainer(cfg, tmp_path / "run") as trainer:
        trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind", "train") == "train"]
    assert [("layer_act_rms" in r) for r in rows] == [False, True, False, True]
    assert all(len(r["layer_attn_logit_max"]) == cfg.model.num_layers for r in rows if "layer_act_rms" in r)


def test_layer_activations_false_turns_off_the_probe_alone():
    cfg = preset("single", "monitor.layer_every=1", "monitor.layer_activations=false")
    rules, st = setup(cfg)
    _, metrics = build_train_step(cfg, rules, st)(init_train_state(cfg, st), synthetic_batch(cfg, 0, rules))
    assert "layer_grad_norm" in metrics and not any(f in metrics for f in (*FIELDS, "layer_act_step"))
