"""Engine review (issue 13): each test here failed before its fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import preset, primitive_dtypes, setup, synthetic_batch
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.observe.hlo import collective_bytes
from picotron_jax.run import build_run
from picotron_jax.train.step import build_grad_fn
from picotron_jax.memory.flops import sub_jaxprs


def test_zero_refuses_a_data_axis_that_does_not_divide_hidden_size():
    """At data=6 ZeRO-3 used to leave every parameter unsplit while the banner said ZeRO-3."""
    cfg = preset("zero3-dp8", "mesh.data=6", "train.global_batch=12")
    with pytest.raises(UserError) as info:
        validate(cfg, 6)
    msg = str(info.value)
    assert "train.zero_stage" in msg and "128" in msg and "mesh.data = 6" in msg
    validate(preset("zero3-dp8", "mesh.data=6", "train.global_batch=12", "train.zero_stage=0"), 6)


def test_replicated_parameter_dimensions_are_reported():
    """A logical rule that cannot split a dimension says so (the banner prints these lines). tp8's 4 KV
    heads used to be such a dimension; they are now split over KV groups (the next test)."""
    run = build_run(preset("tp8"), data=False)
    assert run.rules.unsplit_params(run.setup.spec.logical_axes, run.setup.spec.shapes) == []
    odd = run.rules.unsplit_params({"w": ("embed", "mlp")}, {"w": jax.ShapeDtypeStruct((128, 12), jnp.float32)})
    assert "w dim 1 (mlp=12): tensor=8 does not divide it: parameter replicated on that axis" in odd
    zero3 = build_run(preset("zero3-dp8"), data=False)
    assert zero3.rules.unsplit_params(zero3.setup.spec.logical_axes, zero3.setup.spec.shapes) == []


def test_kv_heads_fewer_than_tensor_ranks_are_split_over_kv_groups():
    """tp8 with 4 KV heads kept wk and wv whole on all 8 ranks. Now (Megatron) tensor rank r holds only
    KV head r // 2, the one its query head r uses: 1/4 of wk, wv and their Adam moments per rank, and the
    compiled step computes on that slice without gathering the weights. Same math: test_layouts.py's
    tp8 parity with one device runs on this layout."""
    from picotron_jax.parallel.sharding import bytes_per_device

    cfg = preset("tp8", "model.num_layers=1", "train.seq_len=16")
    rules, st = setup(cfg)
    devices = list(rules.mesh.devices.flat)  # tensor rank r = device r (every other axis is 1)
    for name in ("wk", "wv"):
        shape = st.abstract.params["layers"][name].shape  # [L, D, G=4, K]
        sharding = st.shardings.params["layers"][name]
        assert sharding.shard_shape(shape) == (1, 128, 1, 16)
        heads = [sharding.devices_indices_map(shape)[d][2] for d in devices]
        assert [h.start for h in heads] == [r // 2 for r in range(8)]
        full = int(np.prod(shape)) * 4
        assert bytes_per_device(st.abstract.params["layers"][name], sharding) == full // 4
    opt = bytes_per_device(st.abstract.opt_state, st.shardings.opt_state)
    params = bytes_per_device(st.abstract.params, st.shardings.params)
    assert opt <= 2 * params + 64  # the Adam moments follow the same layout (plus counters)
    hlo = build_grad_fn(cfg, rules, st).lower(st.abstract.params, synthetic_batch(cfg, 0, rules)).compile().as_text()
    assert "f32[1,128,1,16]" in hlo and collective_bytes(hlo)["all-gather"] == 0


def grad_jaxpr(cfg):
    rules, st = setup(cfg)
    return jax.make_jaxpr(build_grad_fn(cfg, rules, st))(st.abstract.params, synthetic_batch(cfg, 0)), st.policy


def test_norm_overrides_change_the_program_dtypes():
    """Norm overrides used to round only the scale (rms_norm computed in fp32 whatever the dtype) and
    final_norm was never cast: the jaxpr's rsqrt (one per norm; the scan body counts once) shows it."""
    fp32, _ = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=fp32"))
    assert primitive_dtypes(fp32, "rsqrt") == {"float32": 3}
    low, policy = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=fp32",
                                    "precision.overrides=layers.attn_norm:bf16,final_norm:bf16"))
    assert primitive_dtypes(low, "rsqrt") == {"bfloat16": 2, "float32": 1}  # attn_norm, final_norm; mlp_norm fp32
    assert policy.dtype_of("final_norm") == jnp.bfloat16 and policy.dtype_of("layers.mlp_norm") == jnp.float32


def test_norms_are_fp32_in_a_bf16_run_and_the_policy_says_so():
    """In bf16 the norms compute in fp32 (every rsqrt is f32), the policy reports fp32 for them, and an
    fp32 override of a norm is no change (it is not listed as one)."""
    bf16, policy = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=bf16"))
    assert set(primitive_dtypes(bf16, "rsqrt")) == {"float32"}
    assert policy.dtype_of("final_norm") == jnp.float32 and policy.dtype_of("layers.wq") == jnp.bfloat16
    assert "norms fp32" in policy.describe()
    _, same = grad_jaxpr(preset("single", "model.num_layers=2", "precision.mode=bf16",
                                "precision.overrides=final_norm:fp32"))
    assert same.module_dtypes == ()


def router_all_gathers(cfg) -> tuple[int, list[str]]:
    """(all-gather bytes of the compiled grad step, the all-gathers whose op name is in the router)."""
    rules, st = setup(cfg)
    hlo = build_grad_fn(cfg, rules, st).lower(st.abstract.params, synthetic_batch(cfg, 0, rules)).compile().as_text()
    lines = hlo.splitlines()
    gathers = [i for i, line in enumerate(lines) if " all-gather(" in line or "all-gather-start(" in line]
    # the op name is on the instruction or on the bitcast that consumes it (XLA:CPU prints both)
    in_router = [lines[i] for i in gathers
                 if "moe_router" in lines[i] or any(f"%{lines[i].split()[0].lstrip('%')})" in nxt
                                                    and "moe_router" in nxt for nxt in lines[i + 1:i + 3])]
    return collective_bytes(hlo)["all-gather"], in_router


def test_moe_routing_stays_on_each_devices_tokens():
    """top_k over the router scores ran outside any shard_map, so GSPMD all-gathered the global scores
    (f32[B, T, E]) on every device: all-gather bytes grew with the data axis for a fixed per-device batch."""
    small = ("model.num_layers=2", "mesh.expert=2")
    two, two_router = router_all_gathers(preset("moe-ep8", *small, "mesh.num_devices=2", "train.global_batch=4"))
    eight, eight_router = router_all_gathers(preset("moe-ep8", *small, "mesh.data=4", "train.global_batch=16"))
    assert two_router == [] and eight_router == [], eight_router
    assert two == eight  # per-device batch 2 in both: the routing moves nothing across devices


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe-ep8", "moe-ep4-tp2", "moe-dropless-dp2-ep4"])
def test_no_moe_preset_gathers_router_scores(name):
    _, in_router = router_all_gathers(preset(name, "model.num_layers=2"))
    assert in_router == []


@pytest.mark.slow  # two MoE compiles: ~80 s on the loaded 2-core VM (the slow suite runs in CI)
def test_expert_parallel_matches_single_device_with_drops():
    """At the default capacity factor tokens drop; the groups are sequences, so the same copies drop on
    expert=8 as on one device, and loss, routing and gradients agree."""
    from test_layouts import assert_grads_close
    from test_moe_parallel import loss_grads_metrics

    ep_metrics, ep_grads = loss_grads_metrics(preset("moe-ep8", "model.num_layers=2"))
    one_metrics, one_grads = loss_grads_metrics(preset("moe-single", "model.num_layers=2"))
    assert float(np.sum(one_metrics["moe_dropped"])) > 0  # the default capacity factor drops copies here
    np.testing.assert_array_equal(ep_metrics["moe_dropped"], one_metrics["moe_dropped"])
    np.testing.assert_array_equal(ep_metrics["moe_load"], one_metrics["moe_load"])
    np.testing.assert_allclose(ep_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    assert_grads_close(ep_grads, one_grads)


def _has_dot(eqn) -> bool:
    return eqn.primitive.name == "dot_general" or any(
        _has_dot(e) for value in eqn.params.values() for sub in sub_jaxprs(value) for e in sub.eqns)


def ring_steps_waiting_on_their_transfer(jaxpr) -> tuple[int, int]:
    """(loop bodies with a ppermute, of them those where a matmul consumes what a ppermute of the
    same iteration received: a step that computes on the block it just received cannot overlap it)."""
    bodies, waiting = 0, 0

    def visit(jx):
        nonlocal bodies, waiting
        for eqn in jx.eqns:
            for value in eqn.params.values():
                for sub in sub_jaxprs(value):
                    if eqn.primitive.name == "scan" and any(e.primitive.name == "ppermute" for e in sub.eqns):
                        bodies += 1
                        tainted: set = set()
                        for e in sub.eqns:
                            hit = any(not hasattr(v, "val") and v in tainted for v in e.invars)
                            if hit and _has_dot(e):
                                waiting += 1
                                break
                            if hit or e.primitive.name == "ppermute":
                                tainted.update(e.outvars)
                    visit(sub)

    visit(jaxpr.jaxpr)
    return bodies, waiting


@pytest.mark.parametrize("zigzag", [True, False], ids=["zigzag", "contiguous"])
def test_ring_attention_sends_the_next_block_while_computing(zigzag):
    """Forward and backward ring steps send the next K/V block (and the dK/dV accumulator) without any
    matmul of the step waiting for it; the numerics are test_context.py's ring == one device."""
    from jax.sharding import Mesh

    from picotron_jax.config import MESH_AXES
    from picotron_jax.parallel.context import ring_attention
    from picotron_jax.parallel.sharding import MeshRules

    rules = MeshRules(Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 4, 1, 1), MESH_AXES), context_zigzag=zigzag)
    q, k, v = (jnp.ones(s, jnp.float32) for s in ((2, 32, 4, 8), (2, 32, 2, 8), (2, 32, 2, 8)))
    grad = jax.grad(lambda q, k, v: jnp.sum(ring_attention(rules, q, k, v, zigzag)), (0, 1, 2))
    bodies, waiting = ring_steps_waiting_on_their_transfer(jax.make_jaxpr(grad)(q, k, v))
    assert bodies == 2 and waiting == 0, (bodies, waiting)  # the forward ring and the backward ring


def test_attention_asks_for_cudnn_on_gpu_in_half_precision():
    """Without `implementation=` jax.nn.dot_product_attention used XLA's kernel on GPU too."""
    from picotron_jax.models.attention import attention_implementation

    assert attention_implementation("gpu", jnp.bfloat16) == "cudnn"
    assert attention_implementation("cuda", jnp.float16) == "cudnn"
    assert attention_implementation("gpu", jnp.float32) is None  # cuDNN's flash kernel takes fp16/bf16 only
    assert attention_implementation("cpu", jnp.bfloat16) is None
    assert attention_implementation("tpu", jnp.bfloat16) is None


def test_compat_reads_varying_axes_and_fails_loudly_when_the_api_changes(monkeypatch):
    """jax.typeof(x).mat.varying is used through picotron_jax/compat.py, which raises naming the API
    when it is gone, instead of silently treating every value as unvarying."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from picotron_jax import compat

    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    seen = {}

    def body(a):
        seen["inside"] = compat.varying_axes(a)
        seen["made_varying"] = compat.varying_axes(compat.vary(jnp.ones(()), ("x",)))  # pcast of what is missing
        return a

    jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"))(jnp.ones(4))
    assert seen["inside"] == frozenset({"x"}) and compat.varying_axes(jnp.ones(2)) == frozenset()
    assert seen["made_varying"] == frozenset({"x"})
    monkeypatch.setattr(jax, "typeof", lambda x: object())
    with pytest.raises(compat.CompatError, match=r"jax.typeof\(x\).mat.varying.*compat.py"):
        compat.varying_axes(jnp.ones(2))


@pytest.mark.parametrize("name", ["zero1-dp8", "zero3-dp8"])
def test_zero_reduces_gradients_with_a_reduce_scatter(name):
    """GSPMD all-reduced ZeRO's gradients and sliced the sum (1,739,276 B of all-reduce, 0 reduce-scatter
    at 2 layers): now each data rank's gradient sums are reduce-scattered once (parallel/zero.py), so the
    reduce-scatter input is exactly the gradient bytes and the all-reduces are only the step's scalars."""
    from picotron_jax.train.step import build_train_step

    cfg = preset(name, "model.num_layers=1", "train.seq_len=16", "monitor.enabled=false")
    rules, st = setup(cfg)
    hlo = build_train_step(cfg, rules, st).lower(st.abstract, synthetic_batch(cfg, 0, rules)).compile().as_text()
    grad_bytes = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(st.abstract.params))
    moved = collective_bytes(hlo)
    assert moved["reduce-scatter"] == grad_bytes, moved
    assert moved["all-reduce"] < 1024, moved  # loss, token count, norms: no gradient-sized all-reduce
    params = grad_bytes if name == "zero1-dp8" else 2 * grad_bytes  # ZeRO-3 gathers for forward and backward
    assert moved["all-gather"] <= params, moved


def test_compat_wraps_every_private_jax_api_and_fails_loudly(monkeypatch):
    """jax._src.distributed (coordination client), jax._src.xla_bridge and jax._src.source_info_util were
    used directly by the debugger, the launcher and the memory settings; now through compat.py, which
    names the API when it changes instead of failing somewhere else (or not at all)."""
    import pathlib

    from jax._src import distributed, source_info_util, xla_bridge

    from picotron_jax import compat

    assert compat.distributed_state().num_processes in (None, 1)
    with pytest.raises(compat.CompatError, match="initialize"):
        compat.distributed_client()  # one process: no coordination service
    assert compat.backends_are_initialized() is True
    eqn = jax.make_jaxpr(lambda x: x * 2)(1.0).jaxpr.eqns[0]
    assert pathlib.Path(compat.user_frame(eqn.source_info.traceback).file_name).name == "test_engine_review.py"
    for module, name, call, api in ((distributed, "global_state", compat.distributed_state, "global_state"),
                                    (xla_bridge, "backends_are_initialized", compat.backends_are_initialized,
                                     "backends_are_initialized"),
                                    (source_info_util, "user_frame", lambda: compat.user_frame(None), "user_frame")):
        with monkeypatch.context() as patch:
            patch.delattr(module, name)
            with pytest.raises(compat.CompatError, match=rf"{api}.*compat.py"):
                call()
