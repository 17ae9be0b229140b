# %% [markdown]
# # 07 Checkpoints
#
# A checkpoint is the whole train state (step, parameters, optimizer state, loss scale when there is
# one), the resolved config and a small JSON file, written by Orbax: each process writes the slices its
# devices hold. This lesson saves a run, reads the checkpoint with **plain Orbax** in a process that never
# imports picotron_jax, restores it onto another mesh, and exports it to a Hugging Face folder that
# `transformers` loads with the same logits.

# %%
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import picotron_jax as pj
from picotron_jax.checkpoint.hf import export_to_hf
from picotron_jax.models.llama import Llama
from picotron_jax.tutorials import lessons

print(jax.device_count(), "devices")
work = Path(tempfile.mkdtemp(prefix="picotron-lesson-07-"))

# %% [markdown]
# ## Save
#
# With a run directory and `checkpoint.every`, the loop saves (asynchronously) every N steps and at the
# end. `tp2-dp4` trains 4 steps and saves at step 4.

# %%
cfg = pj.load_config("tp2-dp4", ["train.seq_len=32", "train.global_batch=8", "train.steps=4",
                                 "checkpoint.every=4", "logging.progress=false"])
trainer = pj.Trainer(cfg, run_dir=work / "run")
summary = trainer.run()
trainer.close()  # waits for the background write
saved = {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x)
         for p, x in jax.tree_util.tree_flatten_with_path(trainer.params)[0]}
step_dir = work / "run" / "checkpoints" / "4"
print(sorted(p.name for p in step_dir.iterdir()))

# %% [markdown]
# ## Read it with plain Orbax, without picotron_jax
#
# The state folder is an ordinary Orbax PyTree checkpoint (with per-array codecs that Orbax reads itself).
# A fresh Python process restores it as numpy and compares with the trained parameters.

# %%
np.savez(work / "saved.npz", **{k.replace(".", "|"): v for k, v in saved.items()})
script = f"""
import sys, jax, numpy as np, orbax.checkpoint as ocp
ckptr = ocp.PyTreeCheckpointer()
tree = ckptr.metadata({str(step_dir / 'state')!r}).item_metadata.tree
state = ckptr.restore({str(step_dir / 'state')!r}, args=ocp.args.PyTreeRestore(item=tree,
    restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
saved = np.load({str(work / 'saved.npz')!r})
for name in saved.files:
    node = state["params"]
    for key in name.split("|"):
        node = node[key]
    assert np.array_equal(node, saved[name]), name
assert not [m for m in sys.modules if m.startswith("picotron_jax")]
print("plain Orbax read", len(saved.files), "parameters, equal to the trained ones; step", state["step"])
"""
env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=work)
print(out.stdout or out.stderr[-2000:])
assert out.returncode == 0

# %% [markdown]
# ## Restore onto another mesh
#
# `pj.Trainer.restore(path, cfg)` builds the run for the new config and lets Orbax read each device's
# slice in the new layout: here the `tp2-dp4` checkpoint continues on `dp8` with ZeRO-3. The values are the
# same; only the shardings change.

# %%
dp8 = pj.load_config("zero3-dp8", ["train.seq_len=32", "train.global_batch=8", "logging.progress=false"])
moved = pj.Trainer.restore(str(work / "run" / "checkpoints"), cfg=dp8)
lm_head = moved.params["lm_head"]
print("lm_head was", trainer.params["lm_head"].sharding.spec, "now", lm_head.sharding.spec)
assert np.array_equal(np.asarray(lm_head), saved["lm_head"])
jax.debug.visualize_array_sharding(lm_head)
moved.close()

# %% [markdown]
# ## Export to Hugging Face
#
# `export_to_hf` (the `picotron-jax export --to hf` command) writes `model.safetensors` and a Llama
# `config.json`. `transformers` loads it; its logits equal the project's model on the same tokens.

# %%
import torch
import transformers

hf_dir = export_to_hf(step_dir, work / "hf")
hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
with torch.no_grad():
    hf_logits = hf_model(torch.tensor(tokens)).logits.numpy()
graphdef, state = nnx.split(Llama(cfg.model, rngs=nnx.Rngs(0)))
nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, trainer.params))
ours = np.asarray(nnx.merge(graphdef, state)(tokens))
diff = np.abs(ours - hf_logits)
print(f"max |ours - transformers| = {diff.max():.2e} over {diff.size} logits")
assert diff.max() < 1e-4
fig, ax = plt.subplots(figsize=(5, 3))
ax.scatter(ours[0, :, :32].ravel(), hf_logits[0, :, :32].ravel(), s=3)
ax.set_xlabel("picotron_jax logits")
ax.set_ylabel("transformers logits")
plt.show()

# %% [markdown]
# ## Exercise: restore onto a new mesh with plain Orbax
#
# Write `restore_params(state_dir, mesh)`: restore only the parameters with `orbax.checkpoint`, as
# `jax.Array`s on `mesh` (a 1-D mesh with axis `x` over 8 devices), every array with 2 or more dimensions
# split over `x` on its **first dimension that divides by 8**, vectors replicated. Hint: the metadata tree
# gives each array's shape; `ocp.ArrayRestoreArgs(sharding=...)` says where it goes; `partial_restore=True`
# lets you ask for the parameters only. The check compares values and shardings.

# %% answer
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def restore_params(state_dir, mesh):
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(state_dir).item_metadata.tree["params"]
    n = mesh.shape["x"]

    def sharding(m):
        dims = [d for d, s in enumerate(m.shape) if s % n == 0] if len(m.shape) >= 2 else []
        return NamedSharding(mesh, P(*([None] * dims[0] + ["x"])) if dims else P())

    item = {"params": jax.tree.map(lambda _: 0, meta)}
    args = {"params": jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=sharding(m)), meta)}
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                    partial_restore=True))
    return restored["params"]
# %% blank
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def restore_params(state_dir, mesh):
    ...

# %%
new_mesh = jax.make_mesh((8,), ("x",))
lessons.check_restore(restore_params, step_dir / "state", saved, new_mesh)
