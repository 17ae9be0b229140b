"""Few-shot sequence tasks from the corpus (`meta.task=corpus`): adapt the project's Llama to one document.

A task is one source document of `data.source` (for the default `stdlib` corpus: one standard-library `.py`
file, so adapting means picking up that file's names and style). Each document is tokenised with
`data.tokenizer` and cut into non-overlapping windows of train.seq_len + 1 tokens; a task draws
meta.k_support + meta.k_query distinct windows of its document: the first k_support are the support set
(what the inner loop adapts on), the others the query set (held-out sequences of the same document that
score the adapted model). Documents with fewer windows than that are left out.

Held-out tasks: `meta.eval_tasks` whole documents, chosen by a permutation seeded by meta.seed, are set
aside; training task batches draw only from the others, so an evaluated document was never seen, not even
as a support set. Task batch `index` is a pure function of (meta.seed, index, held-out or not) (as the
sinusoids, Finn et al. 2017; per-document tasks as in learn2learn's text task sets).

The model is picotron_jax/models/llama.py built from the `model` section, its loss train/step.py's
`make_loss_sums` (the training's cross-entropy, + train.z_loss), its parameters laid out by the training's
rules (parallel/sharding.py: tensor parallel, ZeRO-3 over data with train.zero_stage=3). The task axis is
vmapped with spmd_axis_name=data under the data-group rules (parallel/zero.py's groups), so the model's
sharding constraints keep each task on its own data rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from picotron_jax.config import Config, DataConfig
from picotron_jax.data.corpus import Corpus
from picotron_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from picotron_jax.errors import UserError
from picotron_jax.models.llama import Llama
from picotron_jax.parallel import zero
from picotron_jax.parallel.sharding import ZERO_AXIS, MeshRules
from picotron_jax.train.state import model_spec
from picotron_jax.train.step import make_loss_sums


@lru_cache(maxsize=4)
def document_windows(source: str, text_field: str, tokenizer: str, vocab_size: int, window: int,
                     min_windows: int) -> tuple[np.ndarray, ...]:
    """Per document (corpus order) with at least `min_windows` windows: its windows [n, window] int32.
    Memoised per process (reading the stdlib corpus takes seconds): a corpus edited during the process is
    not re-read."""
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
        raise UserError(f"config field 'model.vocab_size' = {vocab_size}: data.tokenizer = {tokenizer!r} has "
                        f"{tok.vocab_size} ids; set model.vocab_size >= {tok.vocab_size}")
    out = []
    for text in Corpus.from_config(DataConfig(source=source, text_field=text_field, tokenizer=tokenizer)).documents():
        ids = np.frombuffer(text.encode("utf-8"), np.uint8) if isinstance(tok, ByteTokenizer) else \
            np.asarray(tok.encode(text))
        n = len(ids) // window
        if n >= min_windows:
            out.append(ids[:n * window].reshape(n, window).astype(np.int32))
    return tuple(out)


def split_documents(num_documents: int, eval_tasks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training document ids, held-out document ids): disjoint, sorted, held-out = eval_tasks of them."""
    perm = np.random.default_rng([seed, 0x20]).permutation(num_documents)
    return np.sort(perm[eval_tasks:]), np.sort(perm[:eval_tasks])


@dataclass(eq=False)  # hashed by identity, a static argument of jit
class CorpusTasks:
    """The `corpus` TaskFamily (meta/tasks.py): per-document few-shot next-token tasks and the Llama."""

    cfg: Config
    rules: MeshRules  # the training's rules; `loss` runs under their data-group version
    documents: tuple[np.ndarray, ...]  # eligible documents' windows [n_d, train.seq_len + 1]
    train_ids: np.ndarray
    held_out_ids: np.ndarray
    loss_sums: Callable  # train/step.py's loss sums under the data-group rules
    spmd_axis = ZERO_AXIS

    @classmethod
    def build(cls, cfg: Config, mesh: Any) -> "CorpusTasks":
        m, data = cfg.meta, cfg.data
        if data.mixture:
            raise UserError("config field 'data.mixture' is set: meta.task=corpus draws its tasks from one corpus; "
                            "clear data.mixture and set data.source")
        if cfg.moe.num_experts:
            raise UserError(f"config field 'moe.num_experts' = {cfg.moe.num_experts}: meta.task=corpus meta-learns "
                            f"a dense Llama; set moe.num_experts=0")
        need = m.k_support + m.k_query
        docs = document_windows(data.source, data.text_field, data.tokenizer, cfg.model.vocab_size,
                                cfg.train.seq_len + 1, need)
        if len(docs) < m.eval_tasks + m.tasks_per_step:
            raise UserError(
                f"config fields 'meta.eval_tasks' = {m.eval_tasks} and 'meta.tasks_per_step' = {m.tasks_per_step}: "
                f"data.source = {data.source!r} has {len(docs)} documents of at least {need} windows "
                f"((meta.k_support + meta.k_query) x (train.seq_len + 1) = {need * (cfg.train.seq_len + 1)} "
                f"tokens), but the held-out and one training batch need {m.eval_tasks + m.tasks_per_step} distinct "
                f"documents; lower meta.eval_tasks, meta.tasks_per_step, meta.k_support, meta.k_query or "
                f"train.seq_len, or use a larger corpus")
        train_ids, held_out_ids = split_documents(len(docs), m.eval_tasks, m.seed)
        rules = MeshRules.from_config(mesh, cfg)
        loss_sums = make_loss_sums(cfg, zero.group_rules(rules), model_spec(cfg).graphdef)
        return cls(cfg, rules, docs, train_ids, held_out_ids, loss_sums)

    def sample_tasks(self, index: int, count: int, held_out: bool = False) -> dict:
        """Task batch `index`: {"support": {"tokens": [count, k_support, T + 1]}, "query": {"tokens": [count,
        k_query, T + 1]}} int32, `count` distinct documents of the training (or held-out) set."""
        k = self.cfg.meta.k_support
        seqs = np.stack([self.documents[d][w] for d, w in zip(*self.draw(index, count, held_out))])
        return {"support": {"tokens": seqs[:, :k]}, "query": {"tokens": seqs[:, k:]}}

    def draw(self, index: int, count: int, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Which documents [count] and which of their windows [count, k_support + k_query] (distinct; the
        first k_support the support set) task batch `index` holds."""
        m = self.cfg.meta
        rng = np.random.default_rng([m.seed, index, int(held_out)])
        chosen = rng.choice(self.held_out_ids if held_out else self.train_ids, count, replace=False)
        windows = np.stack([rng.choice(len(self.documents[d]), m.k_support + m.k_query, replace=False)
                            for d in chosen])
        return chosen, windows

    def init(self) -> Any:
        """The Llama's parameters (`model` section, seeded by meta.seed), as a pure dict like training's."""
        model = Llama(self.cfg.model, rngs=nnx.Rngs(self.cfg.meta.seed), moe=self.cfg.moe)
        return nnx.to_pure_dict(nnx.split(model)[1])

    def param_specs(self) -> Any:
        spec = model_spec(self.cfg)
        return self.rules.param_specs(spec.logical_axes, spec.shapes)

    def loss(self, params: Any, batch: dict) -> Any:
        """Mean next-token loss of the sequences batch["tokens"] [k, T + 1]: train/step.py's loss sums
        (the same model code as training) over their T targets each, divided by the token count."""
        tokens_kT = batch["tokens"]
        mask_kT = jnp.ones(tokens_kT[:, 1:].shape, jnp.float32)
        batch_kT = {"inputs": tokens_kT[:, :-1], "targets": tokens_kT[:, 1:], "mask": mask_kT}
        objective, _ = self.loss_sums(params, batch_kT)
        return objective / mask_kT.sum()
