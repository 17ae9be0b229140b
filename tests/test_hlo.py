"""collective_bytes / collective_stats on real compiled HLO (8 virtual CPU devices) and on
hand-written HLO for the forms XLA CPU does not emit (async -start/-done pairs, ...)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from picotron_jax.observe.hlo import (  # noqa: E402
    MAIN_KINDS,
    collective_bytes,
    collective_stats,
)
from picotron_jax.observe.hlo_shapes import shape_bytes  # noqa: E402

N = 8  # devices
L = 1024  # elements per device


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N,), ("x",), axis_types=(AxisType.Auto,))


def _hlo(mesh, fn, dtype=jnp.float32, per_device=L):
    x = jax.device_put(jnp.ones((N * per_device,), dtype), NamedSharding(mesh, P("x")))
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    return f.lower(x).compile().as_text()


def _only(stats_bytes, kind, value):
    """`kind` has `value` bytes, every other main kind 0."""
    assert stats_bytes[kind] == value
    assert all(stats_bytes[k] == 0 for k in MAIN_KINDS if k != kind), stats_bytes


# ------------------------------------------------------------------ compiled by jax (CPU)


def test_psum_is_tensor_size(mesh):
    text = _hlo(mesh, lambda a: jax.lax.psum(a, "x"))
    assert " all-reduce(" in text
    _only(collective_bytes(text), "all-reduce", L * 4)
    assert collective_stats(text)["counts"]["all-reduce"] == 1


def test_all_gather_is_output_size(mesh):
    text = _hlo(mesh, lambda a: jax.lax.all_gather(a[:128], "x", tiled=True))
    _only(collective_bytes(text), "all-gather", N * 128 * 4)


def test_psum_scatter_is_input_size(mesh):
    text = _hlo(mesh, lambda a: jax.lax.psum_scatter(a, "x", tiled=True))
    assert f"f32[{L // N}]{{0}} reduce-scatter(" in text  # output is the 1/N shard ...
    _only(collective_bytes(text), "reduce-scatter", L * 4)  # ... S is the input


def test_ppermute(mesh):
    text = _hlo(mesh, lambda a: jax.lax.ppermute(a, "x", [(i, (i + 1) % N) for i in range(N)]))
    _only(collective_bytes(text), "collective-permute", L * 4)


def test_all_to_all_tuple_form(mesh):
    def f(a):
        return jax.lax.all_to_all(a.reshape(N, L // N), "x", 0, 0, tiled=True).reshape(-1)

    text = _hlo(mesh, f)
    # XLA CPU emits the tuple form: N results f32[1,128], summed to the tensor size
    _only(collective_bytes(text), "all-to-all", L * 4)
    assert collective_stats(text)["counts"]["all-to-all"] == 1


def test_scan_multiplies_by_trip_count(mesh):
    def f(a):
        return jax.lax.scan(lambda c, _: (c + jax.lax.psum(c, "x"), None), a, None, length=5)[0]

    text = _hlo(mesh, f)
    assert '"known_trip_count":{"n":"5"}' in text  # what the parser relies on
    stats = collective_stats(text)
    _only(stats["bytes"], "all-reduce", 5 * L * 4)
    assert stats["counts"]["all-reduce"] == 5
    assert stats["unknown_trip_counts"] == 0


def test_nested_scan_multiplies_product(mesh):
    def inner(c, _):
        return c + jax.lax.psum(c, "x"), None

    def outer(c, _):
        c = c + jax.lax.psum(c[:8], "x").sum()  # one psum per outer step
        return jax.lax.scan(inner, c, None, length=3)[0], None

    text = _hlo(mesh, lambda a: jax.lax.scan(outer, a, None, length=4)[0])
    stats = collective_stats(text)
    assert stats["counts"]["all-reduce"] == 4 * 3 + 4
    assert stats["bytes"]["all-reduce"] == 4 * 3 * L * 4 + 4 * 8 * 4
    assert stats["unknown_trip_counts"] == 0


def test_dtype_sizes(mesh):
    psum = lambda a: jax.lax.psum(a, "x")  # noqa: E731
    f32 = collective_bytes(_hlo(mesh, psum, jnp.float32))["all-reduce"]
    f16 = collective_bytes(_hlo(mesh, psum, jnp.float16))["all-reduce"]
    s8 = collective_bytes(_hlo(mesh, psum, jnp.int8))["all-reduce"]
    assert (f32, f16, s8) == (4 * L, 2 * L, L)


def test_bf16_reports_what_cpu_actually_moves(mesh):
    # XLA CPU widens bf16 collectives to f32 (convert, f32 all-gather, convert): the parser
    # reports the traffic of the compiled program, not of the jax-level dtype.
    text = _hlo(mesh, lambda a: jax.lax.all_gather(a[:128], "x", tiled=True), jnp.bfloat16)
    moved = "f32" if jax.default_backend() == "cpu" else "bf16"  # one width per backend, not either
    assert f" {moved}[1024]{{0}} all-gather(" in text, text
    _only(collective_bytes(text), "all-gather", N * 128 * (4 if moved == "f32" else 2))


def test_while_loop_unknown_trip_count_counts_once(mesh):
    def f(a):
        return jax.lax.while_loop(lambda c: c[0] < 10, lambda c: c + jax.lax.psum(c, "x"), a)

    text = _hlo(mesh, f)
    assert '"known_trip_count"' not in text
    stats = collective_stats(text)
    assert stats["bytes"]["all-reduce"] == L * 4
    assert stats["unknown_trip_counts"] == 1


def test_cond_counts_the_heavier_branch(mesh):
    def f(a):
        return jax.lax.cond(
            a[0] > 0,
            lambda b: b + jax.lax.psum(b, "x"),  # 4 KiB
            lambda b: b + jax.lax.psum(b[:16], "x").sum(),  # 64 B
            a,
        )

    text = _hlo(mesh, f)
    assert "conditional(" in text and "branch_computations={" in text
    stats = collective_stats(text)
    assert stats["bytes"]["all-reduce"] == L * 4
    assert stats["counts"]["all-reduce"] == 1


def test_gspmd_matmul_partial_sum(mesh):
    # contracting dimension sharded: every device all-reduces the full [64,512] partial product
    x = jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P(None, "x")))
    w = jax.device_put(jnp.ones((256, 512)), NamedSharding(mesh, P("x", None)))
    f = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P()))
    compiled = f.lower(x, w).compile()
    _only(collective_bytes(compiled.as_text()), "all-reduce", 64 * 512 * 4)
    assert collective_bytes(compiled) == collective_bytes(compiled.as_text())  # object accepted


def test_no_collectives_all_zero(mesh):
    x = jax.device_put(jnp.ones((N * L,)), NamedSharding(mesh, P("x")))
    text = jax.jit(lambda a: jnp.sin(a) * 2).lower(x).compile().as_text()
    stats = collective_stats(text)
    assert stats["bytes"] == dict.fromkeys(MAIN_KINDS, 0)
    assert stats["counts"] == dict.fromkeys(MAIN_KINDS, 0)
    assert stats["unknown_trip_counts"] == 0
    assert collective_bytes("") == dict.fromkeys(MAIN_KINDS, 0)


# ------------------------------------------------------------------ hand-written HLO


def test_shape_bytes_dtypes_and_layouts():
    assert shape_bytes("f32[64,256]{1,0}") == 64 * 256 * 4
    assert shape_bytes("f32[]") == 4
    assert shape_bytes("bf16[3,5]{0,1}") == 30
    assert shape_bytes("f16[8]") == 16
    assert shape_bytes("pred[10]") == 10
    assert shape_bytes("s8[7]") == shape_bytes("u8[7]") == 7
    assert shape_bytes("s32[2]") == shape_bytes("u32[2]") == 8
    assert shape_bytes("f64[2]") == shape_bytes("s64[2]") == shape_bytes("c64[2]") == 16
    assert shape_bytes("c128[2]") == 32
    assert shape_bytes("f8e4m3fn[16]") == 16
    assert shape_bytes("s4[16]") == 8
    assert shape_bytes("f32[4,8]{1,0:T(8,128)}") == 128
    assert shape_bytes("f32[<=16]") == 64  # bounded dynamic: the bound
    assert shape_bytes("(f32[2], /*index=1*/(s32[], bf16[4]), token[])") == 8 + 4 + 8


ASYNC = """
HloModule m, is_scheduled=true

%add (p0: f32[], p1: f32[]) -> f32[] {
  %p0 = f32[] parameter(0)
  %p1 = f32[] parameter(1)
  ROOT %add = f32[] add(%p0, %p1)
}

%a2a_computation (q: bf16[8,64]) -> bf16[8,64] {
  %q = bf16[8,64]{1,0} parameter(0)
  ROOT %a2a = bf16[8,64]{1,0} all-to-all(%q), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

ENTRY %main (a: f32[128], b: f32[1024], c: bf16[8,64]) -> f32[1024] {
  %a = f32[128]{0} parameter(0)
  %b = f32[1024]{0} parameter(1)
  %c = bf16[8,64]{1,0} parameter(2)
  %ags = (f32[128]{0}, f32[1024]{0}) all-gather-start(%a), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = f32[1024]{0} all-gather-done(%ags)
  %cps = (f32[1024]{0}, f32[1024]{0}, u32[], u32[]) collective-permute-start(%b), channel_id=2, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[1024]{0} collective-permute-done(%cps)
  %rss = ((f32[1024]{0}), f32[128]{0}) reduce-scatter-start(%b), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
  %rsu = ((f32[1024]{0}), f32[128]{0}) reduce-scatter-update(%rss)
  %rsd = f32[128]{0} reduce-scatter-done(%rsu)
  %ars = f32[1024]{0} all-reduce-start(%b), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ard = f32[1024]{0} all-reduce-done(%ars)
  %as = ((bf16[8,64]{1,0}), bf16[8,64]{1,0}, s32[]) async-start(%c), calls=%a2a_computation
  %ad = bf16[8,64]{1,0} async-done(%as), calls=%a2a_computation
  ROOT %out = f32[1024]{0} add(%agd, %cpd)
}
"""


def test_async_pairs_count_once_without_bundle_double_count():
    stats = collective_stats(ASYNC)
    assert stats["bytes"] == {
        "all-gather": 1024 * 4,  # output of (operand, output)
        "collective-permute": 1024 * 4,  # not operand+output+2 u32 contexts
        "reduce-scatter": 1024 * 4,  # input of ((operand), output)
        "all-reduce": 1024 * 4,
        "all-to-all": 8 * 64 * 2,  # inside async-start's computation, not again via async-done
    }
    assert stats["counts"] == dict.fromkeys(MAIN_KINDS, 1)


def test_async_start_operands_unknown_still_no_double_count():
    # operand shapes unresolvable (not defined in the snippet): the bundle alone decides
    text = """
ENTRY main {
  s = (s32[2]{0}, s32[16]{0}) all-gather-start(missing), dimensions={0}
  d = s32[16]{0} all-gather-done(s)
  cp = (f32[], f32[], u32[], u32[]) collective-permute-start(missing2), source_target_pairs={{0,1}}
  ROOT cpd = f32[] collective-permute-done(cp)
}
"""
    b = collective_bytes(text)
    assert b["all-gather"] == 64 and b["collective-permute"] == 4


def test_tuple_results_and_multiline_instructions():
    text = """
HloModule t

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

ENTRY %e (p: f32[256], q: bf16[64], r: f32[8,16]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  %q = bf16[64]{0} parameter(1)
  %r = f32[8,16]{1,0} parameter(2)
  %ar = (f32[256]{0}, bf16[64]{0}) all-reduce(f32[256]{0} %p, bf16[64]{0} %q),
      channel_id=1, replica_groups={{0,1}},
      to_apply=%sum, metadata={op_name="jit(f)/psum"}
  %s0 = f32[1,16]{1,0} slice(%r), slice={[0:1], [0:16]}
  %a2a = (f32[1,16]{1,0}, f32[1,16]{1,0}, f32[1,16]{1,0}, f32[1,16]{1,0}, f32[1,16]{1,0}, /*index=5*/f32[1,16]{1,0}, f32[1,16]{1,0}, f32[1,16]{1,0}) all-to-all(%s0, %s0, %s0, %s0, %s0, /*index=5*/%s0, %s0, %s0), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}
  ROOT %g = f32[256]{0} get-tuple-element(%ar), index=0
}
"""
    stats = collective_stats(text)
    assert stats["bytes"]["all-reduce"] == 256 * 4 + 64 * 2
    assert stats["bytes"]["all-to-all"] == 8 * 16 * 4
    assert stats["counts"]["all-reduce"] == stats["counts"]["all-to-all"] == 1


def test_handwritten_while_call_and_conditional():
    text = """
HloModule w

%body (t: (s32[], f32[100])) -> (s32[], f32[100]) {
  %t = (s32[], f32[100]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[100]{0} get-tuple-element(%t), index=1
  %ag = f32[100]{0} call(%v), to_apply=%gather_fn
  ROOT %o = (s32[], f32[100]{0}) tuple(%i, %ag)
}

%cond (t: (s32[], f32[100])) -> pred[] {
  %t = (s32[], f32[100]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %flag = s32[] all-reduce(%i), replica_groups={}, to_apply=%max
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%flag, %n), direction=LT
}

%gather_fn (z: f32[100]) -> f32[100] {
  %z = f32[100]{0} parameter(0)
  %zs = f32[10]{0} slice(%z), slice={[0:10]}
  ROOT %g = f32[100]{0} all-gather(%zs), replica_groups={}, dimensions={0}
}

%max (a: s32[], b: s32[]) -> s32[] {
  %a = s32[] parameter(0)
  %b = s32[] parameter(1)
  ROOT %m = s32[] maximum(%a, %b)
}

%small (x: f32[100]) -> f32[100] {
  %x = f32[100]{0} parameter(0)
  ROOT %cp = f32[100]{0} collective-permute(%x), source_target_pairs={{0,1}}
}

%big (x: f32[100]) -> f32[100] {
  %x = f32[100]{0} parameter(0)
  %w = (s32[], f32[100]{0}) tuple(%x, %x)
  %loop = (s32[], f32[100]{0}) while(%w), condition=%cond, body=%body
  ROOT %r = f32[100]{0} get-tuple-element(%loop), index=1
}

ENTRY %main (p: f32[100], k: pred[]) -> f32[100] {
  %p = f32[100]{0} parameter(0)
  %k = pred[] parameter(1)
  %init = s32[] constant(0)
  %t0 = (s32[], f32[100]{0}) tuple(%init, %p)
  %w = (s32[], f32[100]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %v = f32[100]{0} get-tuple-element(%w), index=1
  ROOT %c = f32[100]{0} conditional(%k, %v, %v), true_computation=%big, false_computation=%small
}
"""
    stats = collective_stats(text)
    # known loop: body (call -> all-gather) 7x, condition (s32 all-reduce) 7+1 = 8x
    # conditional: %big (loop of unknown length, counted once: 1 all-gather + 1 all-reduce)
    # outweighs %small (one 400-byte collective-permute), so only %big counts
    assert stats["counts"]["all-gather"] == 7 + 1
    assert stats["bytes"]["all-gather"] == (7 + 1) * 400
    assert stats["counts"]["all-reduce"] == 8 + 1
    assert stats["bytes"]["all-reduce"] == (8 + 1) * 4
    assert stats["bytes"]["collective-permute"] == 0
    assert stats["unknown_trip_counts"] == 1


def test_extra_kinds_appear_only_when_present():
    assert "ragged-all-to-all" not in collective_bytes(ASYNC)
    text = """
ENTRY main {
  in = bf16[64]{0} parameter(0)
  out = bf16[128]{0} parameter(1)
  o = s64[8]{0} parameter(2)
  ROOT r = bf16[128]{0} ragged-all-to-all(in, out, o, o, o, o), replica_groups={{0,1,2,3,4,5,6,7}}
}
"""
    b = collective_bytes(text)
    assert b["ragged-all-to-all"] == 256  # max(input, output buffer); offsets not counted
    assert all(b[k] == 0 for k in MAIN_KINDS)


def test_collectives_over_size_one_groups_move_nothing():
    """A psum over a size-1 mesh axis stays in the HLO as an all-reduce with one-device groups."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    f = jax.shard_map(lambda x: jax.lax.psum(x, "tensor"), mesh=mesh, in_specs=P("tensor"), out_specs=P())
    text = jax.jit(f).lower(jnp.ones(1024)).compile().as_text()
    assert "all-reduce" in text
    assert collective_bytes(text)["all-reduce"] == 0
    hand = "replica_groups={{0},{1}}"
    assert collective_bytes(_wrap_ar(hand))["all-reduce"] == 0
    assert collective_bytes(_wrap_ar("replica_groups={{0,1}}"))["all-reduce"] == 4096
    assert collective_bytes(_wrap_ar("replica_groups=[4,1]<=[4]"))["all-reduce"] == 0
    assert collective_bytes(_wrap_ar("replica_groups=[1,4]<=[4]"))["all-reduce"] == 4096


def _wrap_ar(groups: str) -> str:
    return f"""HloModule m

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}}

ENTRY %main (p: f32[1024]) -> f32[1024] {{
  %p = f32[1024]{{0}} parameter(0)
  ROOT %r = f32[1024]{{0}} all-reduce(%p), channel_id=1, {groups}, use_global_device_ids=true, to_apply=%add
}}
"""
