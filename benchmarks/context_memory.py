"""Context parallelism measurements: per-device compiled memory (cp=1,2,4,8) and work balance.
Run from the repo root: .venv/bin/python benchmarks/context_memory.py [seq_len] (about a minute)"""
import os, sys, json, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, "tests")
import jax.numpy as jnp, numpy as np
from helpers import preset, setup, synthetic_batch
from picotron_jax.train.state import init_train_state
from picotron_jax.train.step import build_train_step
from picotron_jax.observe.hlo import collective_bytes
from picotron_jax.parallel.context import ring_attention_work
from test_context import rules_for

T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
MiB = 2**20
print(f"# train step, cp8-long model (D=128, 4 layers, 8/4 heads), seq {T}, global_batch 1, fp32")
for c in (1, 2, 4, 8):
    cfg = preset("cp8-long", f"train.seq_len={T}", "train.global_batch=1", f"mesh.context={c}",
                 f"mesh.num_devices={c}")
    rules, st = setup(cfg)
    state = init_train_state(cfg, st)
    t0 = time.time()
    compiled = build_train_step(cfg, rules, st).lower(state, synthetic_batch(cfg, 0, rules)).compile()
    m = compiled.memory_analysis()
    coll = collective_bytes(compiled.as_text())
    print(json.dumps({"context": c, "temp_MiB": round(m.temp_size_in_bytes / MiB, 1),
                      "argument_MiB": round(m.argument_size_in_bytes / MiB, 2),
                      "collective_MiB": {k: round(v / MiB, 2) for k, v in coll.items() if v},
                      "compile_s": round(time.time() - t0, 1)}))

print(f"# forward ring work: query x key pairs scored per context rank, seq {T}")
q = jnp.zeros((1, T, 1, 2)); kv = jnp.zeros((1, T, 1, 2))
for c in (2, 4, 8):
    for zz in (True, False):
        w = np.asarray(ring_attention_work(rules_for(c, zigzag=zz), q, kv, kv, zigzag=zz))
        print(json.dumps({"context": c, "zigzag": zz, "pairs_per_rank": [int(x) for x in w],
                          "max_over_min": round(float(w.max() / w.min()), 3)}))
