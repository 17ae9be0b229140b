"""Checkpoint codecs and lossy storage: every codec round-trips bitwise and is what zarr.json records, `auto`
is deterministic and never worse than the best single codec, plain Orbax reads every lossless codec without
picotron_jax, lossy modes are refused with require_lossless, marked lossy, and restore within their bounds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from helpers import preset, setup
from picotron_jax.checkpoint import codec_select, codecs
from picotron_jax.checkpoint.hf import export_to_hf
from picotron_jax.checkpoint.inspect import format_info, list_steps, step_info
from picotron_jax.checkpoint.manager import Checkpointer, state_tree
from picotron_jax.checkpoint.metadata import leaf_names
from picotron_jax.checkpoint.restore import restore_train_state
from picotron_jax.cli import main
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError

LOSSLESS = ("zstd", "lz4", "blosc-zstd", "blosc-lz4", "none", "auto")


def trained_like(st):
    """A train state with a trained one's character, built on the host (no compilation): parameters ~ N(0, 0.02),
    mu ~ N(0, 1e-3), nu log-normal over several decades (as Adam's second moments are; fresh ones are zeros)."""
    rng = np.random.default_rng(7)

    def fill(path, a, sharding):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            value = np.full(a.shape, 5, a.dtype)
        elif "/nu/" in name:
            value = np.exp(-14.0 + 2.0 * rng.standard_normal(a.shape))
        else:
            value = (1e-3 if "/mu/" in name else 0.02) * rng.standard_normal(a.shape)
        return jax.device_put(np.asarray(value, a.dtype), sharding)

    return jax.tree_util.tree_map_with_path(fill, st.abstract, st.shardings)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same state saved with every lossless codec (level 3), one folder each."""
    tmp = tmp_path_factory.mktemp("codecs")
    cfg = preset("single", "checkpoint.keep=0", "checkpoint.async_save=true")
    _, st = setup(cfg)
    state = trained_like(st)
    for codec in LOSSLESS:
        cfg.checkpoint.codec = codec
        ckpt = Checkpointer(tmp / codec, cfg, say=lambda _m: None)
        ckpt.save(state, {"mesh": "single"})
        ckpt.close()
    return tmp, cfg, st, state


def chains(step_dir: Path) -> dict[str, list[dict]]:
    """Each array's per-chunk codecs as its zarr.json (inside the OCDBT database) records them."""
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}).result()
    out = {}
    for key in kv.list().result():
        if key.endswith(b"/zarr.json"):
            out[key.decode()[:-len("/zarr.json")]] = json.loads(kv.read(key).result().value)[
                "codecs"][0]["configuration"]["codecs"][1:]  # after `bytes`
    return out


def strip_defaults(chain: list[dict]) -> list[dict]:
    """TensorStore writes resolved configurations (blosc's typesize, zstd's checksum flag): compare what we set."""
    out = []
    for c in chain:
        conf = {k: v for k, v in c.get("configuration", {}).items() if k not in ("typesize", "checksum")}
        out.append({"name": c["name"], **({"configuration": conf} if conf else {})})
    return out


def test_every_codec_round_trips_bitwise_and_zarr_json_records_it(saved):
    tmp, cfg, st, state = saved
    for codec in LOSSLESS:
        restored, meta, _ = restore_train_state(str(tmp / codec), st.abstract, st.shardings, cfg)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        plan = codecs.CodecPlan(3, meta["compression"]["kinds"])
        recorded = chains(tmp / codec / "5")
        assert sorted(recorded) == sorted(n.replace("/", ".") for n in meta["arrays"])
        for name, chain in recorded.items():
            assert chain[-1] == {"name": "crc32c"}
            assert strip_defaults(chain) == plan.chain_for(name), (codec, name)
            if codec != "auto":
                assert meta["compression"]["arrays"][name.replace(".", "/")]["codec"] == codec
        assert not meta["lossy"] and meta["compression"]["codec"] == codec
        # once written, each array's bytes on disk are in the metadata, and add up to about the folder's size
        arrays = meta["compression"]["arrays"]
        assert all(a["bytes"] > 0 and a["ratio"] == round(a["bytes"] / a["raw_bytes"], 4) for a in arrays.values())
        assert 0.9 < sum(a["bytes"] for a in arrays.values()) / list_steps(str(tmp / codec))[0]["bytes_on_disk"] <= 1


def test_auto_is_deterministic_smallest_on_its_sample_and_within_2_percent_of_the_best_codec(saved):
    tmp, _cfg, _st, state = saved
    stored = state_tree(state)
    plan_a, report_a = codec_select.choose(stored, 3, 0.0)
    plan_b, report_b = codec_select.choose(stored, 3, 0.0)
    assert plan_a == plan_b
    for kind, entry in report_a["kinds"].items():
        ratios = entry["sample_ratio"]
        assert ratios == report_b["kinds"][kind]["sample_ratio"]  # encoded sizes are a function of the data
        assert ratios[entry["codec"]] == min(ratios.values())
    # byte shuffling pays on log-normal second moments; 4-byte counters grow under every compressor
    assert plan_a.by_kind["second_moment"].startswith("blosc-") and plan_a.by_kind["counters"] == "none"
    on_disk = {c: sum(a["bytes"] for a in step_info(str(tmp / c))["arrays"]) for c in LOSSLESS}
    assert on_disk["auto"] <= 1.02 * min(on_disk[c] for c in LOSSLESS if c != "auto"), on_disk
    # a time budget no compressor fits leaves everything uncompressed
    assert set(codec_select.choose(stored, 3, 1e-12)[0].by_kind.values()) == {"none"}


def readme_snippet(step_dir: str) -> str:
    """README's 'Without picotron_jax' snippet, verbatim but for its step_dir's path, its last line kept as `wq`."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index("**Without picotron_jax.**"):]
    lines = after[after.index("```python\n") + len("```python\n"):].split("```", 1)[0].splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("step_dir = "))
    lines[at] = re.sub(r'"[^"]*"', repr(step_dir).replace("'", '"'), lines[at], count=1)
    lines[-1] = "wq = " + lines[-1].split("#")[0].strip()
    return "\n".join(lines)


def test_plain_orbax_reads_every_lossless_codec_without_picotron_jax(saved, tmp_path):
    """Plain Orbax in a process without picotron_jax reads every codec bitwise, and README's snippet runs
    as printed on a relative path."""
    tmp, _cfg, _st, state = saved
    reference = {n.replace("/", "|"): np.asarray(x) for n, x in zip(leaf_names(state_tree(state)),
                                                                    jax.tree.leaves(state_tree(state)))}
    np.savez(tmp_path / "reference.npz", **reference)
    script = f"""
import sys, jax, numpy as np, orbax.checkpoint as ocp
reference = np.load({str(tmp_path / 'reference.npz')!r})
for codec in {list(LOSSLESS)!r}:
    step_dir = {str(tmp)!r} + "/" + codec + "/5/state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(step_dir).item_metadata.tree
    state = ckptr.restore(step_dir, args=ocp.args.PyTreeRestore(item=tree, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
    flat = {{jax.tree_util.keystr(p, simple=True, separator="|"): x
             for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}}
    assert sorted(flat) == sorted(reference.files), codec
    for name in reference.files:
        assert np.array_equal(flat[name], reference[name]), (codec, name)
{readme_snippet(os.path.relpath(tmp / "auto" / "5", tmp_path))}
assert meta["step"] == 5 and np.array_equal(wq, reference["params|layers|wq"]), meta
assert not [m for m in sys.modules if m.startswith("picotron_jax")]
print("read", len(reference.files), "arrays x", {len(LOSSLESS)}, "codecs")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"x {len(LOSSLESS)} codecs" in result.stdout


def test_lossy_storage_is_refused_with_require_lossless_marked_and_restored_within_its_bounds(saved, tmp_path, capsys):
    _tmp, _cfg, st, state = saved
    for field in ("quantize_optimizer", "quantize_params"):
        with pytest.raises(UserError, match=f"checkpoint.{field}' = 'int8' stores the state lossy.*require_lossless"):
            validate(preset("single", f"checkpoint.{field}=int8", "checkpoint.require_lossless=true"), 1)
    with pytest.raises(UserError, match="checkpoint.quantize_optimizer' = 'int4': valid values are 'none', 'bf16'"):
        validate(preset("single", "checkpoint.quantize_optimizer=int4"), 1)
    moments = {}
    for mode in ("bf16", "int8"):
        cfg = preset("single", "checkpoint.keep=0", f"checkpoint.quantize_optimizer={mode}")
        ckpt = Checkpointer(tmp_path / mode, cfg, say=lambda _m: None)
        ckpt.save(state, {"mesh": "single"})
        ckpt.close()
        restored, meta, _ = restore_train_state(str(tmp_path / mode), st.abstract, st.shardings, cfg)
        assert meta["lossy"] and meta["quantization"]["first_moment"] == mode
        for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):  # parameters exact
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(restored.step) == int(state.step)
        moments[mode] = restored.opt_state
        info = step_info(str(tmp_path / mode))
        assert info["valid"] and info["lossy"] and "LOSSY: first_moment " + mode in format_info(info)
        assert "LOSSY: first_moment" in list_steps(str(tmp_path / mode))[0]["valid"]
        strict = preset("single", "checkpoint.require_lossless=true")
        with pytest.raises(UserError, match="stores part of the state lossy .*require_lossless is set"):
            restore_train_state(str(tmp_path / mode), st.abstract, st.shardings, strict)
    mu, nu = state.opt_state[1][0].mu, state.opt_state[1][0].nu
    for name, saved_moment in (("mu", mu), ("nu", nu)):
        for x, y in zip(jax.tree.leaves(getattr(moments["bf16"][1][0], name)), jax.tree.leaves(saved_moment)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == np.float32 and np.all(np.abs(x - y) <= 2.0 ** -8 * np.abs(y))
    for x, y in zip(jax.tree.leaves(moments["int8"][1][0].mu), jax.tree.leaves(mu)):
        x, y = np.asarray(x), np.asarray(y)  # within half a step of 1/127 of the largest |mu| of the array
        assert x.dtype == np.float32 and np.max(np.abs(x - y)) <= 0.5 / 127 * np.max(np.abs(y)) * 1.001
    for x, y in zip(jax.tree.leaves(moments["int8"][1][0].nu), jax.tree.leaves(nu)):
        x, y = np.asarray(x), np.asarray(y)  # sqrt(nu) rounded up: never smaller, at most a step larger
        assert np.all(x >= y * (1 - 1e-6))
        assert np.all(np.sqrt(x) - np.sqrt(y) <= np.sqrt(np.max(y)) / 255 * 1.001)
    assert main(["ckpt", "info", str(tmp_path / "int8")]) == 0
    assert "LOSSY: first_moment int8, second_moment int8" in capsys.readouterr().out


def test_quantized_parameters_only_when_asked_and_exported_as_float32(saved, tmp_path):
    _tmp, _cfg, st, state = saved
    cfg = preset("single", "checkpoint.keep=0", "checkpoint.quantize_params=bf16")
    ckpt = Checkpointer(tmp_path / "p", cfg, say=lambda _m: None)
    ckpt.save(state, {"mesh": "single"})
    ckpt.close()
    info = step_info(str(tmp_path / "p"))
    dtypes = {a["name"]: a["dtype"] for a in info["arrays"]}
    assert dtypes["params/embed"] == "bfloat16" and dtypes["opt_state/1/0/mu/embed"] == "float32"
    restored, _, _ = restore_train_state(str(tmp_path / "p"), st.abstract, st.shardings, cfg)
    exact = np.asarray(state.params["embed"])
    np.testing.assert_allclose(np.asarray(restored.params["embed"]), exact, rtol=2.0 ** -8)
    from safetensors.numpy import load_file

    out = export_to_hf(tmp_path / "p" / "5", tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == np.float32
    np.testing.assert_allclose(tensors["model.embed_tokens.weight"], exact, rtol=2.0 ** -8)
