"""MoE block on one device: routing, the Switch loss by hand, dropped tokens against a plain
reference, dropless == capacity without drops == a dense reference, the mixed layer stack, config errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import preset
from picotron_jax.config import ModelConfig, MoEConfig
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.models import moe
from picotron_jax.models.attention import rotary_tables
from picotron_jax.models.llama import LOCAL_OPS, Llama, attention_residual, decoder_block, rms_norm

E, K, D, F = 4, 2, 16, 24


def expert_weights(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "router": jax.random.normal(k[0], (D, E)),
        "w_gate": 0.3 * jax.random.normal(k[1], (E, D, F)),
        "w_up": 0.3 * jax.random.normal(k[2], (E, D, F)),
        "w_down": 0.3 * jax.random.normal(k[3], (E, F, D)),
    }


def every_expert_output(p, x_BTD):
    """[B, T, E, D]: every expert applied to every token (the dense reference)."""
    gate = jnp.einsum("btd,edf->btef", x_BTD, p["w_gate"])
    up = jnp.einsum("btd,edf->btef", x_BTD, p["w_up"])
    return jnp.einsum("btef,efd->bted", jax.nn.silu(gate) * up, p["w_down"])


def reference_kept(experts_BTK, scores_BTK, capacity):
    """Plain loops: per sequence and expert, keep the `capacity` copies with the highest score
    (ties: earlier token, then earlier choice)."""
    B, T, Kk = experts_BTK.shape
    kept = np.zeros((B, T, Kk), bool)
    for b in range(B):
        for e in range(int(experts_BTK.max()) + 1):
            copies = [(t, j) for t in range(T) for j in range(Kk) if experts_BTK[b, t, j] == e]
            copies.sort(key=lambda tj: (-scores_BTK[b, tj[0], tj[1]], tj[0], tj[1]))
            for t, j in copies[:capacity]:
                kept[b, t, j] = True
    return kept


def test_switch_aux_loss_hand_example():
    # 4 tokens, 2 experts, top-1: f = (3/4, 1/4), P = (0.6, 0.4) -> 2 * (0.75*0.6 + 0.25*0.4) = 1.1
    probs = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    experts = jnp.array([[0], [0], [1], [0]])
    np.testing.assert_allclose(moe.switch_aux_loss(probs, experts), 1.1, rtol=1e-6)
    # 2 tokens, 3 experts, top-2: f = (1/4, 2/4, 1/4), P = (0.3, 0.45, 0.25) -> 3 * 0.3625
    probs = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(moe.switch_aux_loss(probs, jnp.array([[0, 1], [1, 2]])), 1.0875, rtol=1e-6)
    # perfectly uniform routing gives exactly 1
    np.testing.assert_allclose(moe.switch_aux_loss(jnp.full((4, 4), 0.25), jnp.array([[0], [1], [2], [3]])), 1.0)


def test_router_z_loss_hand_example():
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    np.testing.assert_allclose(moe.router_z_loss(logits), (math.log(2) ** 2 + math.log(4) ** 2) / 2, rtol=1e-6)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_routing_top_k_weights_and_bias(score):
    p = expert_weights()
    h = jax.random.normal(jax.random.key(1), (2, 8, D))
    cfg = MoEConfig(num_experts=E, top_k=K, score=score)
    r = moe.route(h, p["router"], None, cfg)
    logits = np.asarray(jnp.einsum("btd,de->bte", h, p["router"]))
    np.testing.assert_array_equal(np.sort(np.asarray(r.experts_BTK), -1), np.sort(np.argsort(-logits, -1)[..., :K], -1))
    np.testing.assert_allclose(np.asarray(r.weights_BTK).sum(-1), 1.0, rtol=1e-6)
    # a large bias on expert 3 makes everyone choose it, but does not change the weights' formula
    r_b = moe.route(h, p["router"], jnp.array([0.0, 0.0, 0.0, 10.0]), cfg)
    assert np.all(np.any(np.asarray(r_b.experts_BTK) == 3, axis=-1))
    scores = jax.nn.softmax(logits, -1) if score == "softmax" else jax.nn.sigmoid(logits)
    chosen = np.take_along_axis(np.asarray(scores), np.asarray(r_b.experts_BTK), -1)
    np.testing.assert_allclose(r_b.weights_BTK, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)


def test_capacity_formula():
    assert moe.expert_capacity(32, 2, 8, 1.25) == 10  # ceil(32 * 2 / 8 * 1.25)
    assert moe.expert_capacity(32, 2, 8, 100.0) == 32  # never more than the sequence
    assert moe.expert_capacity(30, 1, 8, 1.0) == 4


@pytest.mark.parametrize("quantise", [False, True])
def test_dropped_set_equals_reference(quantise):
    B, T = 3, 16
    p = expert_weights()
    h = jax.random.normal(jax.random.key(2), (B, T, D))
    r = moe.route(h, p["router"], None, MoEConfig(num_experts=E, top_k=K))
    scores = np.asarray(r.priority_BTK)
    if quantise:  # many ties: the tie-break order is part of the contract
        scores = np.round(scores, 1)
    for capacity in (1, 3, 5):
        pos = moe.capacity_positions(r.experts_BTK, jnp.asarray(scores), E)
        kept = np.asarray(pos) < capacity
        np.testing.assert_array_equal(kept, reference_kept(np.asarray(r.experts_BTK), scores, capacity))
        assert 0 < kept.sum() < B * T * K


def test_capacity_block_equals_dense_reference_with_drops():
    """The block's output is sum over kept copies of weight * expert(x), dropped copies give zero."""
    B, T = 2, 16
    p = expert_weights()
    h = jax.random.normal(jax.random.key(3), (B, T, D))
    cfg = MoEConfig(num_experts=E, top_k=K, dispatch="capacity", capacity_factor=1.0)
    y, stats = moe.moe_ffn(p, h, cfg, LOCAL_OPS)
    r = moe.route(h, p["router"], None, cfg)
    C = moe.expert_capacity(T, K, E, 1.0)
    kept = reference_kept(np.asarray(r.experts_BTK), np.asarray(r.priority_BTK), C)
    all_BTED = every_expert_output(p, h)
    picked_BTKD = jnp.take_along_axis(all_BTED, r.experts_BTK[..., None], axis=2)
    ref = jnp.einsum("btkd,btk->btd", picked_BTKD, r.weights_BTK * kept)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert float(stats["dropped"]) == B * T * K - kept.sum() > 0
    np.testing.assert_array_equal(stats["load"], np.bincount(np.asarray(r.experts_BTK).ravel(), minlength=E))


def test_dropless_equals_capacity_without_drops_and_gradients_match():
    B, T = 2, 16
    p = expert_weights()
    h = jax.random.normal(jax.random.key(4), (B, T, D))

    def loss(p, dispatch):
        cfg = MoEConfig(num_experts=E, top_k=K, dispatch=dispatch, capacity_factor=E / K)  # C = T: no drops
        y, stats = moe.moe_ffn(p, h, cfg, LOCAL_OPS)
        return jnp.sum(jnp.sin(y)) + stats["aux"] + stats["z"], (y, stats)

    (l_c, (y_c, s_c)), g_c = jax.value_and_grad(loss, has_aux=True)(p, "capacity")
    (l_d, (y_d, s_d)), g_d = jax.value_and_grad(loss, has_aux=True)(p, "dropless")
    assert float(s_c["dropped"]) == 0.0
    np.testing.assert_allclose(y_d, y_c, rtol=1e-5, atol=1e-6)
    for name in p:  # atol relative to the largest entry, as tests/test_layouts.py (fp32 round-off of sums ~15)
        scale = float(np.abs(g_c[name]).max())
        np.testing.assert_allclose(g_d[name], g_c[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    assert float(jnp.abs(g_d["router"]).max()) > 0  # the router learns through the combine weights


def test_shared_experts_add_a_dense_swiglu():
    B, T, S = 2, 8, 12
    p = expert_weights()
    k = jax.random.split(jax.random.key(5), 3)
    shared = {"shared_gate": jax.random.normal(k[0], (D, S)), "shared_up": jax.random.normal(k[1], (D, S)),
              "shared_down": jax.random.normal(k[2], (S, D))}
    h = jax.random.normal(jax.random.key(6), (B, T, D))
    cfg = MoEConfig(num_experts=E, top_k=K, dispatch="dropless")
    y0, _ = moe.moe_ffn(p, h, cfg, LOCAL_OPS)
    y1, _ = moe.moe_ffn({**p, **shared}, h, cfg, LOCAL_OPS)
    dense = (jax.nn.silu(h @ shared["shared_gate"]) * (h @ shared["shared_up"])) @ shared["shared_down"]
    np.testing.assert_allclose(y1 - y0, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("first_dense,every_n", [(1, 3), (0, 2)])
def test_mixed_stack_equals_layer_by_layer_loop(first_dense, every_n):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2)
    mcfg = MoEConfig(num_experts=4, top_k=2, first_dense_layers=first_dense, every_n_layers=every_n,
                     dispatch="dropless", shared_experts=1, bias_update_rate=0.01)
    model = Llama(cfg, rngs=nnx.Rngs(0), moe=mcfg)
    plan = model.moe_plan
    moe_layers = list(range(first_dense, 4, every_n))
    assert plan.moe_layers == moe_layers
    assert model.layers["w_gate"].shape[0] == 4 - len(moe_layers)
    assert model.moe["w_gate"].shape == (len(moe_layers), 4, 32, 48)
    tokens = jax.random.randint(jax.random.key(7), (2, 8), 0, 64)
    h, stats = model.hidden_states_and_moe_stats(tokens)
    assert stats["load"].shape == (len(moe_layers), 4)

    x = jnp.take(model.embed[...], tokens, axis=0)
    cos, sin = rotary_tables(jnp.arange(8), cfg.resolved_head_dim, cfg.rope_theta)
    layers = {k: v[...] for k, v in model.layers.items()}
    dense_i = moe_i = 0
    for i in range(4):
        p = {k: v[i] for k, v in layers.items() if k not in ("w_gate", "w_up", "w_down")}
        if i in moe_layers:
            x = attention_residual(p, x, cos, sin, cfg, LOCAL_OPS)
            p_moe = {k: v[moe_i] for k, v in model.moe.items()}
            x = x + moe.moe_ffn(p_moe, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), mcfg, LOCAL_OPS)[0]
            moe_i += 1
        else:
            p.update({k: layers[k][dense_i] for k in ("w_gate", "w_up", "w_down")})
            x = decoder_block(p, x, cos, sin, cfg, LOCAL_OPS)
            dense_i += 1
    np.testing.assert_allclose(h, rms_norm(x, model.final_norm[...], cfg.rms_norm_eps), rtol=1e-5, atol=1e-5)


def test_dense_model_has_no_moe_params():
    cfg = preset("single")
    abstract = nnx.state(nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0), moe=cfg.moe)))
    assert "moe" not in nnx.to_pure_dict(abstract)


@pytest.mark.parametrize("overrides,field,allowed", [
    (["moe.num_experts=6", "mesh.expert=4"], "moe.num_experts", "divisible by mesh.expert = 4"),
    (["moe.top_k=9"], "moe.top_k", "between 1 and moe.num_experts = 8"),
    (["moe.capacity_factor=0"], "moe.capacity_factor", "must be > 0 in capacity mode"),
    (["moe.dispatch=ragged"], "moe.dispatch", "'capacity', 'dropless'"),
    (["moe.score=relu"], "moe.score", "'softmax', 'sigmoid'"),
    (["moe.every_n_layers=3"], "moe.every_n_layers", "must divide"),
    (["moe.expert_size=175", "mesh.tensor=2"], "moe.expert_size", "divisible by mesh.tensor = 2"),
    (["moe.aux_loss=-1"], "moe.aux_loss", ">= 0"),
])
def test_bad_moe_config_names_the_field(overrides, field, allowed):
    cfg = preset("moe-single", "mesh.num_devices=0", "mesh.data=-1", *overrides)
    with pytest.raises(UserError) as err:
        validate(cfg, 8)
    assert f"'{field}'" in str(err.value) and allowed in str(err.value)


def test_capacity_factor_is_free_in_dropless_mode():
    validate(preset("moe-single", "moe.dispatch=dropless", "moe.capacity_factor=0"), 1)


def test_flops_count_active_moe_parameters():
    """MFU counts what a token passes through: router, top_k routed and shared experts, per MoE layer."""
    from picotron_jax.observe.flops import flops_per_token, non_embedding_params

    model = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                        num_kv_heads=2)
    moe_cfg = MoEConfig(num_experts=8, top_k=2, expert_size=48, shared_experts=1, first_dense_layers=1)
    D, F, Fe = 64, 128, 48
    per_moe_layer = D * 8 + 3 * D * Fe * (2 + 1) - 3 * D * F  # router + 3 experts' SwiGLU, minus the dense MLP
    assert non_embedding_params(model, moe_cfg) - non_embedding_params(model) == 3 * per_moe_layer
    assert flops_per_token(model, 32, MoEConfig()) == flops_per_token(model, 32)  # num_experts 0: dense


def test_mlp_precision_overrides_on_an_moe_model_are_refused():
    """The experts run in the compute dtype: an override of the MLP modules would silently skip them."""
    from helpers import setup
    from picotron_jax.train.step import build_train_step

    cfg = preset("moe-single", "precision.overrides=layers.w_*:bf16")
    rules, st = setup(cfg)
    with pytest.raises(UserError, match=r"MoE layers .*MLP overrides \(layers.w_gate"):
        build_train_step(cfg, rules, st)
