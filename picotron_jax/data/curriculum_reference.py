"""Difficulty from a reference model (`curriculum.metric=reference`): a window's score is the mean token
loss a trained checkpoint (`curriculum.reference_checkpoint`) gives it; lower loss = easier.

This is the "learned difficulty" of curriculum learning: a reference model's loss ranks the examples
(Xu et al., "Curriculum Learning for Natural Language Understanding", ACL 2020; the scoring function of
Hacohen & Weinshall, "On the Power of Curriculum Learning", ICML 2019), here one score per training window
of the run's token file, computed once and cached with the other metrics (curriculum_difficulty.py).

The reference is opened through the library API: `Trainer.restore(step_dir, cfg)` with the config stored in
the checkpoint (model, optimizer, precision: what makes its train state) on this run's mesh, data and
batch, so it runs on the run's devices. Its vocabulary and sequence length must be the run's (one UserError
naming the field otherwise). The windows go through one jitted program, a batch of `train.global_batch`
windows at a time:

    loss_B = sum_t (logsumexp(logits_BTV) - logits_BTV[target_BT]) / T

the same forward as the train step (model.hidden_states_and_moe_stats, the policy's dtypes, logits in fp32).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from picotron_jax.config import (Config, DebugConfig, FaultsConfig, LoggingConfig, MonitorConfig, ProfileConfig,
                                 config_from_dict)
from picotron_jax.errors import UserError

FIELD = "curriculum.reference_checkpoint"


def reference_step(path: str) -> tuple[str, int, dict]:
    """The checkpoint `path` names (a checkpoints folder: its newest step; or one step folder):
    (step folder, step, its metadata)."""
    from picotron_jax.checkpoint.restore import UnreadableCheckpoint, read_meta, split_location
    from picotron_jax.checkpoint.storage import open_store

    if not path:
        raise UserError(f"config field '{FIELD}' is empty: curriculum.metric=reference needs a checkpoint, e.g. "
                        f"{FIELD}=runs/ref/checkpoints (its newest step) or runs/ref/checkpoints/200")
    root, step = split_location(path)
    if "://" not in root and not Path(root).expanduser().is_dir():
        raise UserError(f"config field '{FIELD}' = {path!r}: no such checkpoint folder; give a run's checkpoints "
                        f"folder or one step folder of it")
    store = open_store(str(Path(root).expanduser()) if "://" not in root else root, 0, 0)
    steps = store.steps()
    if not steps or (step is not None and step not in steps):
        raise UserError(f"config field '{FIELD}' = {path!r}: no checkpoint there (steps found: "
                        f"{', '.join(map(str, steps)) or 'none'}); give a run's checkpoints folder or one step folder")
    step = steps[-1] if step is None else step
    step_dir = store.fetch(step)
    try:
        meta = read_meta(step_dir)
    except UnreadableCheckpoint as exc:
        raise UserError(f"config field '{FIELD}' = {path!r}: checkpoint {step} is unusable: {exc}") from None
    return str(step_dir), step, meta


def reference_key(path: str) -> str:
    """A short hash of the reference's identity (resolved step folder, step, saved_at): the scores' cache
    key, so another checkpoint (or the same folder saved again) is scored anew."""
    step_dir, step, meta = reference_step(path)
    where = step_dir if "://" in step_dir else str(Path(step_dir).resolve())
    identity = json.dumps([where, step, meta.get("saved_at"), meta.get("tokens_seen")])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def reference_config(cfg: Config, meta: dict, vocab_size: int) -> Config:
    """The reference's config: its own train-state sections, this run's mesh, data and batch; checks that it
    reads this run's tokens (vocabulary) at this run's length."""
    if cfg.mesh.pipe > 1:  # the scoring program is the plain forward (hidden_states), not the pipeline's
        raise UserError(f"config field 'curriculum.metric' = 'reference' scores on the run's mesh without pipeline "
                        f"stages, but mesh.pipe = {cfg.mesh.pipe}: set mesh.pipe=1 or use curriculum.metric=compression")
    saved = config_from_dict(meta["config"])
    if saved.model.vocab_size != cfg.model.vocab_size or saved.model.vocab_size < vocab_size:
        raise UserError(f"config field '{FIELD}' = {cfg.curriculum.reference_checkpoint!r}: its model.vocab_size is "
                        f"{saved.model.vocab_size}, this run's {cfg.model.vocab_size} (the data has {vocab_size} "
                        f"tokens); use a reference trained with this run's tokenizer and model.vocab_size")
    if saved.train.seq_len != cfg.train.seq_len:
        raise UserError(f"config field '{FIELD}' = {cfg.curriculum.reference_checkpoint!r}: its train.seq_len is "
                        f"{saved.train.seq_len}, this run's {cfg.train.seq_len}; score with a reference trained at "
                        f"train.seq_len={cfg.train.seq_len}")
    return saved.replace(
        mesh=cfg.mesh, pipeline=cfg.pipeline, data=cfg.data, eval=cfg.eval, distributed=cfg.distributed,
        train={k: getattr(cfg.train, k) for k in ("global_batch", "grad_accum", "zero_stage", "context_zigzag",
                                                  "stop_at_step")},
        checkpoint={"dir": "", "require_lossless": False},
        logging=LoggingConfig(progress=False), memory={"live_arrays": False}, curriculum={"kind": "none"},
        faults=FaultsConfig(), profile=ProfileConfig(), debug=DebugConfig(), monitor=MonitorConfig())


def build_window_loss(cfg: Config, rules: Any, setup: Any):
    """Jitted (params, batch) -> mean token loss of each row, float32 [B] (replicated)."""
    from picotron_jax.parallel.ops import MeshOps
    from picotron_jax.train.remat import make_layer_stack
    from picotron_jax.train.step import to_sequence_layout

    ops, policy, layer_stack = MeshOps(rules), setup.policy, make_layer_stack(cfg)
    compute_dtype, head_dtype = jnp.dtype(policy.compute_dtype), policy.dtype_of("head")

    def window_loss(params, batch):
        model = nnx.merge(setup.spec.graphdef, nnx.State(params))
        batch, positions_T = to_sequence_layout(batch, rules)
        h_BTD, _ = model.hidden_states_and_moe_stats(batch["inputs"], ops, compute_dtype, positions_T,
                                                     policy.model_dtypes(), layer_stack)
        head = model.head_weight().astype(head_dtype)
        spec = "btd,vd->btv" if model.head_is_vocab_first else "btd,dv->btv"
        logits_BTV = jnp.einsum(spec, h_BTD.astype(head_dtype), head, preferred_element_type=jnp.float32)
        target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT, axis=-1)  # order-free over T

    batch_shardings = {k: rules.batch_sharding() for k in ("inputs", "targets")}
    return jax.jit(window_loss, in_shardings=(setup.shardings.params, batch_shardings),
                   out_shardings=rules.named(P()))


def reference_scores(ds: Any, cfg: Config) -> np.ndarray:
    """Mean token loss of the reference on each training window of `ds`, float64 [num_sequences]."""
    from picotron_jax.data.curriculum_difficulty import window_tokens
    from picotron_jax.data.loader import place_rows
    from picotron_jax.trainer import Trainer

    step_dir, _, meta = reference_step(cfg.curriculum.reference_checkpoint)
    ref_cfg = reference_config(cfg, meta, ds.vocab_size)
    with Trainer.restore(step_dir, ref_cfg) as ref:
        loss = build_window_loss(ref.cfg, ref.built.rules, ref.built.setup)
        sharding, B, n = ref.built.rules.batch_sharding(), ref.cfg.train.global_batch, ds.num_sequences
        out = np.empty(n, np.float64)
        for lo in range(0, n, B):
            def read_rows(rows: np.ndarray) -> dict[str, np.ndarray]:
                tokens = window_tokens(ds, (lo + rows) % n).astype(np.int32)  # the last batch: padded, then cut
                return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

            batch = place_rows(read_rows, B, ds.seq_len, sharding)
            out[lo:min(lo + B, n)] = np.asarray(jax.device_get(loss(ref.params, batch)))[: n - lo]
    return out
