"""Auto-tuning: the layout enumeration (count = closed form, every candidate valid, divisibility kept), the
cost model on hand-computed examples, the per-axis collective accounting, the compile cache, and the
`tune layout` command end to end on 8 virtual devices (the chosen layout fits the budget, the one a
budget excludes is reported over budget with its compiled bytes, the preset trains as written)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import ROOT
from picotron_jax.cli import main
from picotron_jax.config import load_config
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.tune import layout as tune_layout
from picotron_jax.tune.cost import Collectives, Hardware, collectives_by_axes, load_target, predict_step
from picotron_jax.tune.layout import compile_cached, spearman
from picotron_jax.tune.space import (Layout, apply, count_factorisations, enumerate_layouts, factorisations)

TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "train.seq_len=32", "train.global_batch=8", "train.steps=3",
        "optimizer.warmup_steps=1", "logging.every=1"]
MOE = ["moe.num_experts=4", "moe.top_k=2", "moe.expert_size=64"]


@pytest.mark.parametrize("n,k", [(1, 5), (6, 5), (8, 5), (12, 5), (16, 3), (30, 5), (64, 5)])
def test_factorisation_count_is_the_closed_form(n, k):
    f = factorisations(n, k)
    assert len(f) == len(set(f)) == count_factorisations(n, k)
    assert all(math.prod(x) == n and len(x) == k for x in f)


def test_closed_form_by_hand():
    assert count_factorisations(8) == math.comb(3 + 4, 4) == 35  # 2^3 over 5 axes
    assert count_factorisations(12) == math.comb(2 + 4, 4) * 5 == 75  # 2^2 * 3


@pytest.mark.parametrize("extra", [[], MOE], ids=["dense", "moe"])
def test_every_candidate_passes_validation_and_keeps_divisibility(extra):
    cfg = load_config(None, TINY + extra)
    layouts, rejected = enumerate_layouts(cfg, 8, remats=("none", "full"), zeros=(0, 3), accums=(1, 2))
    # every (mesh, knobs) combination is either a candidate or rejected by validation
    # pipe > 1: schedule (1f1b, interleaved) x microbatches; else remat x grad_accum; ZeRO 0/3 with a data axis
    total = sum(2 * 2 * (2 if f[1] > 1 else 1) for f in factorisations(8))
    assert len(layouts) + rejected == total and layouts and rejected
    m, B = cfg.model, cfg.train.global_batch
    for lay in layouts:
        lcfg = apply(cfg, lay, 8)
        assert validate(lcfg, 8) == lay.mesh
        assert m.num_heads % lay.tensor == 0 and m.intermediate_size % lay.tensor == 0
        assert (B // lay.grad_accum) % (lay.data * lay.expert) == 0
        v = lay.virtual_stages if lay.schedule == "interleaved" else 1
        assert m.num_layers % (lay.pipe * v) == 0
        if extra:
            assert 4 % lay.expert == 0  # MoE takes remat and pipelines (each stage whole [MoE, dense] groups)
            assert (m.num_layers // (lay.pipe * v)) % lcfg.moe.every_n_layers == 0
        assert cfg.train.seq_len % (2 * lay.context if lay.context > 1 else 1) == 0
    assert len(set(layouts)) == len(layouts)
    assert any(lay.pipe > 1 for lay in layouts)  # MoE models get pipelined candidates too


def test_enumeration_errors_name_the_flag():
    cfg = load_config(None, TINY)
    with pytest.raises(UserError, match="--axes: 'model'"):
        enumerate_layouts(cfg, 8, axes=("data", "model"))


def test_cost_model_by_hand():
    hw = Hardware(flops_per_s=1e9, bandwidth={"pipe": 1e9, "data": 1e9, "context": 1e9, "expert": 1e9,
                                              "tensor": 1e10}, latency_s=1e-3)
    coll = Collectives({"data": 2_000_000_000, "tensor": 10_000_000_000, "data,tensor": 1_000_000_000},
                       {"data": 2, "tensor": 5, "data,tensor": 1})
    p = predict_step(4e9, coll, 0.25, hw, busy_share=0.75)
    assert p["compute_s"] == pytest.approx(3.0)  # 3e9 busy FLOPs at 1e9/s
    assert p["bubble_s"] == pytest.approx(1.0)  # the idle quarter of the slots: 3 s / (1 - 0.25) - 3 s
    assert p["comm_s"] == pytest.approx(2.0 + 1.0 + 1.0)  # data,tensor moves at the slower link (data)
    assert p["latency_s"] == pytest.approx(8e-3)
    assert p["step_s"] == pytest.approx(3.0 + 1.0 + 4.0 + 8e-3)
    shared = Hardware(**{**hw.as_dict(), "shared_host": True})
    assert predict_step(4e9, coll, 0.25, shared, busy_share=0.75)["bubble_s"] == 0.0
    assert predict_step(4e9, Collectives(), 0.0, hw)["step_s"] == pytest.approx(4.0)  # no pipeline, no traffic


def test_pipeline_shares_by_hand():
    from picotron_jax.parallel.pipeline_schedule import build_schedule
    from picotron_jax.tune.cost import pipeline_shares

    # 1F1B, p = 2, m = 4: 10 slots (F or B per rank and slot), 4 of the 20 rank-slots idle
    assert pipeline_shares(build_schedule("1f1b", 2, 4)) == pytest.approx((4 / 20, 4 / 10))
    # AFAB differentiates its forward phase: m + p - 1 = 5 slots of F (+ their B) for m = 4 microbatches
    assert pipeline_shares(build_schedule("afab", 2, 4)) == pytest.approx((4 / 20, 4 / 5))


def test_target_yaml(tmp_path):
    t = load_target(ROOT / "meshes/targets/2x8xh100.yaml")
    assert t.bandwidth["tensor"] > t.bandwidth["data"] and t.memory_bytes == 80 * 2**30 and not t.shared_host
    (tmp_path / "bad.yaml").write_text("peak_flops: 1e15\nbandwidth: {model: 1e9}\n")
    with pytest.raises(UserError, match="bandwidth.model is not a mesh axis"):
        load_target(tmp_path / "bad.yaml")


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 2], [1, 2]) is None


def test_collectives_are_attributed_to_the_axes_they_span():
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 1, 1, 4), ("pipe", "data", "context", "expert", "tensor"))
    x = jax.device_put(jnp.ones((2, 4 * 256), jnp.float32), NamedSharding(mesh, P("data", "tensor")))
    f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "tensor"), mesh=mesh, in_specs=P("data", "tensor"),
                              out_specs=P("data", "tensor")))
    coll = collectives_by_axes(f.lower(x).compile().as_text(), (1, 2, 1, 1, 4))
    assert coll.bytes_by_axes == {"tensor": 256 * 4} and coll.count_by_axes == {"tensor": 1}


def test_compile_cache_hits_the_second_time(tmp_path, monkeypatch):
    cfg = apply(load_config(None, TINY), Layout(data=2), 2)
    first, cached1 = compile_cached(cfg, jax.devices()[:2], tmp_path)
    calls = []
    monkeypatch.setattr(tune_layout, "compile_candidate", lambda *a: calls.append(a))
    second, cached2 = compile_cached(cfg, jax.devices()[:2], tmp_path)
    assert (cached1, cached2) == (False, True) and not calls and first == second
    assert first["peak_bytes"] > 0 and first["flops"] > 0 and "data" in first["collective_bytes"]
    other = apply(load_config(None, TINY), Layout(data=2, zero_stage=3), 2)  # another layout: another key
    assert tune_layout.cache_key(other, jax.devices()[:2]) != tune_layout.cache_key(cfg, jax.devices()[:2])


SEARCH = ["--devices", "8", "--axes", "data,tensor", "--remat", "none", "--accum", "1", "--steps", "2"]


def _search(tmp, name: str, *extra: str) -> dict:
    out = tmp / f"{name}.json"
    assert main(["tune", "layout", *TINY, *SEARCH, *extra, "--cache-dir", str(tmp / "cache"), "--json", str(out),
                 "--out", str(tmp / f"{name}.yaml")]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow  # compiles every candidate layout, then measures the best
def test_tune_layout_end_to_end(tmp_path):
    """d8, d4 t2, d2 t4 (t8 is rejected: 4 heads), ZeRO 0; the best predicted is measured."""
    rep = _search(tmp_path, "a", "--zero", "0", "--top", "1")
    cands = rep["candidates"]
    assert len(cands) == 3 and rep["rejected_by_validation"] == 1
    assert all(not c["error"] and c["fits"] and c["peak_bytes"] > 0 and not c["cached"] for c in cands)
    assert [c["measured_step_s"] is not None for c in cands] == [True, False, False]  # the best predicted
    assert [c["predicted_step_s"] for c in cands] == sorted(c["predicted_step_s"] for c in cands)
    best = rep["chosen"]
    assert best["label"] == cands[0]["label"] and best["measured_tokens_per_s"] > 0

    # a budget below the chosen layout's peak, ranking only (--top 0): the compile results come from the
    # cache, the choice fits, the excluded layout is reported over budget with its compiled bytes
    budget = best["peak_bytes"] - 1
    rep2 = _search(tmp_path, "b", "--zero", "0", "--top", "0", "--memory-budget", str(budget))
    assert all(c["cached"] for c in rep2["candidates"]) and rep2["memory_budget_bytes"] == budget
    assert rep2["chosen"]["peak_bytes"] <= budget and rep2["chosen"]["label"] != best["label"]
    assert rep2["chosen"]["measured_step_s"] is None  # predicted, not measured
    excluded = next(c for c in rep2["candidates"] if c["label"] == best["label"])
    assert excluded["fits"] is False and excluded["peak_bytes"] == best["peak_bytes"]
    assert rep2["over_budget"] >= 1

    # a cluster that is not here: ranked by the target's figures (the cached compiles), nothing measured
    rep3 = _search(tmp_path, "c", "--zero", "0", "--target", str(ROOT / "meshes/targets/2x8xh100.yaml"))
    assert all(c["cached"] and c["measured_step_s"] is None for c in rep3["candidates"])
    assert "predicted, not measured" in rep3["hardware"]["source"] and rep3["chosen"]["fits"]
    assert rep3["memory_budget_bytes"] == 80 * 2**30

    # the preset runs as written
    preset = tmp_path / "a.yaml"
    raw = yaml.safe_load(preset.read_text())
    assert {a: raw["mesh"][a] for a in ("pipe", "data", "context", "expert", "tensor")} == \
        {a: best["layout"][a] for a in ("pipe", "data", "context", "expert", "tensor")}
    assert raw["mesh"]["num_devices"] == 8 and raw["train"]["zero_stage"] == best["layout"]["zero_stage"]
    assert main(["train", "--config", str(preset), "--run-dir", str(tmp_path / "run"), "train.steps=2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 for r in rows)


@pytest.mark.slow
def test_tune_layout_measures_the_best_predicted_and_picks_the_fastest_measured(tmp_path):
    rep = _search(tmp_path, "a", "--zero", "0,3", "--top", "3")
    cands = rep["candidates"]
    assert len(cands) == 6 and all(not c["error"] for c in cands)
    measured = [c for c in cands if c["measured_step_s"] is not None]
    assert measured == cands[:3] and rep["measured"] == 3
    assert rep["chosen"]["measured_step_s"] == min(c["measured_step_s"] for c in measured)
    assert rep["spearman_predicted_measured"] is not None


def test_tune_layout_errors(tmp_path, capsys):
    assert main(["tune", "layout", *TINY, "--devices", "8", "--remat", "bogus"]) == 2
    assert "--remat 'bogus'" in capsys.readouterr().err
    assert main(["tune", "layout", *TINY, "model.num_heads=3", "model.num_kv_heads=3", "--devices", "8",
                 "--axes", "tensor"]) == 2
    assert "no layout of 8 devices over tensor" in capsys.readouterr().err
