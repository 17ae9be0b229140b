"""Text generation: prompt -> tokens -> KV-cache decoding on the mesh -> text.

One jitted program per (prompt length, new tokens, sampling settings): the prompt fills the cache in
one forward, then a `lax.scan` samples one token per step (models/decode.py). Parameters keep the
run's shardings (tensor-parallel heads and vocabulary, ZeRO-3 shards gathered by XLA); the cache is
laid out like the keys (KV heads over `tensor`). Greedy decoding (temperature 0) is deterministic;
sampling draws from `jax.random` keyed by (seed, position), so a seed repeats its text.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from picotron_jax.callback import Callback
from picotron_jax.config import Config
from picotron_jax.data.tokenizer import load_tokenizer
from picotron_jax.errors import UserError
from picotron_jax.models.decode import cached_forward, init_cache
from picotron_jax.parallel.ops import MeshOps
from picotron_jax.parallel.sharding import MeshRules


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None = the whole vocabulary
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Config, max_new_tokens: int | None = None, temperature: float | None = None,
                    top_k: int | None = None, seed: int | None = None) -> "Sampling":
        """Explicit values, else config `generate` (whose top_k 0 means the whole vocabulary)."""
        g = cfg.generate
        return cls(g.max_new_tokens if max_new_tokens is None else max_new_tokens,
                   g.temperature if temperature is None else temperature,
                   (g.top_k or None) if top_k is None else top_k, g.seed if seed is None else seed)

    def check(self, prompt_len: int, context: int) -> None:
        if prompt_len == 0:
            raise UserError("the prompt is empty; give at least one character of text")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens = {self.max_new_tokens}: must be >= 1")
        if not self.temperature >= 0:
            raise UserError(f"temperature = {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k = {self.top_k}: must be >= 1 (leave it out to sample from the whole vocabulary)")
        if prompt_len + self.max_new_tokens > context:
            raise UserError(f"the prompt has {prompt_len} tokens and max_new_tokens = {self.max_new_tokens}, together "
                            f"{prompt_len + self.max_new_tokens}, but the model's context is train.seq_len = {context} "
                            f"tokens; shorten the prompt or ask for fewer new tokens")


def pick(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token [B]: argmax, or a sample from softmax(logits / T) over the top k."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


_SAMPLERS: dict = {}


def _sampler(cfg_model, rules: MeshRules, prompt_len: int, sampling: Sampling):
    """The jitted sampler for this model, mesh, prompt length and sampling (built once, then reused)."""
    key = (repr(cfg_model), rules, prompt_len, sampling)
    if key not in _SAMPLERS:
        if len(_SAMPLERS) >= 16:
            _SAMPLERS.pop(next(iter(_SAMPLERS)))
        _SAMPLERS[key] = _build_sampler(cfg_model, rules, prompt_len, sampling)
    return _SAMPLERS[key]


def _build_sampler(cfg_model, rules: MeshRules, prompt_len: int, sampling: Sampling):
    ops = MeshOps(rules)
    total = prompt_len + sampling.max_new_tokens
    cache_axes = ("layers", "batch", "seq", "kv_heads", "head_dim")

    def sample(params, prompt_BT):
        B = prompt_BT.shape[0]
        cache = init_cache(cfg_model, B, total, params["embed"].dtype)
        cache = {k: ops.constrain(v, cache_axes) for k, v in cache.items()}
        logits_BV, cache = cached_forward(params, prompt_BT, cache, jnp.int32(0), cfg_model, ops)
        key = jax.random.key(sampling.seed)

        def step(carry, t):
            logits_BV, cache = carry
            token_B = pick(logits_BV, jax.random.fold_in(key, t), sampling)
            logits_BV, cache = cached_forward(params, token_B[:, None], cache, prompt_len + t, cfg_model, ops)
            return (logits_BV, cache), token_B

        _, tokens_NB = jax.lax.scan(step, (logits_BV, cache), jnp.arange(sampling.max_new_tokens))
        return tokens_NB.T

    return jax.jit(sample, out_shardings=rules.named(P()))


def generate_tokens(cfg: Config, rules: MeshRules, params, prompt_ids: list[int], sampling: Sampling) -> list[int]:
    """The new token ids after `prompt_ids` (one sequence)."""
    if cfg.moe.enabled:
        raise UserError("generation decodes dense models; this one has MoE layers (moe.num_experts = "
                        f"{cfg.moe.num_experts}), whose cached decoding is not built yet")
    sampling.check(len(prompt_ids), cfg.train.seq_len)
    prompt_BT = jnp.asarray(np.asarray(prompt_ids, np.int32)[None, :])
    fn = _sampler(cfg.model, rules, len(prompt_ids), sampling)
    return [int(t) for t in np.asarray(jax.device_get(fn(params, prompt_BT)))[0]]


def generate_text(cfg: Config, rules: MeshRules, params, prompt: str, sampling: Sampling) -> str:
    """The continuation of `prompt` (text only; the prompt is not repeated), decoded by the run's tokenizer."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    return tokenizer.decode(generate_tokens(cfg, rules, params, tokenizer.encode(prompt), sampling))


class SampleAtEnd(Callback):
    """After a training run, print `generate.prompt` and its continuation (every process decodes: the
    program is collective; process 0 prints)."""

    def on_run_end(self, trainer, summary):
        g, cfg = trainer.cfg.generate, trainer.cfg
        if summary.error or summary.steps_run == 0 or cfg.moe.enabled:
            return
        room = cfg.train.seq_len - len(load_tokenizer(cfg.data.tokenizer).encode(g.prompt))
        if room < 1:
            trainer.say(f"sample: generate.prompt is longer than train.seq_len = {cfg.train.seq_len}; no sample")
            return
        n = min(g.max_new_tokens, room)
        text = trainer.generate(g.prompt, max_new_tokens=n)
        how = "greedy" if g.temperature == 0 else f"temperature {g.temperature:g}"
        trainer.say(f"sample ({how}, {n} tokens) | {g.prompt!r} -> {text!r}")


# ------------------------------------------------------------------------------ the command


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model (KV-cache decoding)",
                       description="picotron-jax generate --run-dir runs/default --prompt 'def main():'")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", help="a run directory: its config.yaml and newest good checkpoint")
    where.add_argument("--checkpoint", help="a checkpoint folder (its newest good step) or one step's folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: generate.max_new_tokens (64)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generate.temperature)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides of the saved config, e.g. mesh.tensor=2 (the layout to decode on)")


def decoding_config(cfg: Config) -> tuple[Config, str]:
    """The saved run's config on a mesh decoding can use: pipeline and context axes folded into data."""
    if cfg.mesh.pipe == 1 and cfg.mesh.context == 1:
        return cfg, ""
    note = (f"decoding on mesh pipe=1 context=1 (the run trained with pipe={cfg.mesh.pipe}, "
            f"context={cfg.mesh.context}; the checkpoint is resharded)")
    mesh = {"pipe": 1, "context": 1, "data": -1, "expert": cfg.mesh.expert, "tensor": cfg.mesh.tensor}
    return cfg.replace(mesh=mesh, pipeline={"schedule": "none"}), note


def cmd_generate(args) -> int:
    import sys
    from pathlib import Path

    from picotron_jax.checkpoint.restore import default_location, read_meta, restore_train_state, split_location
    from picotron_jax.checkpoint.storage import open_store
    from picotron_jax.config import config_from_dict, load_config
    from picotron_jax.run import build_run

    say = lambda message: print(message, file=sys.stderr)  # noqa: E731 - stdout carries the text only
    if args.run_dir:
        config_file = Path(args.run_dir) / "config.yaml"
        if not config_file.is_file():
            raise UserError(f"--run-dir {args.run_dir}: no config.yaml there; give the directory a training run wrote")
        cfg = load_config(config_file)
        location = default_location(cfg, Path(args.run_dir))
        if not open_store(location).steps():
            raise UserError(f"no checkpoint in {location}: the run saved none (checkpoint.every = "
                            f"{cfg.checkpoint.every}); train with checkpoint.every=N to generate from it")
    else:
        root, step = split_location(args.checkpoint)
        steps = open_store(root).steps()
        if not steps or (step is not None and step not in steps):
            raise UserError(f"--checkpoint {args.checkpoint}: no checkpoint there (steps: "
                            f"{', '.join(map(str, steps)) or 'none'})")
        cfg = config_from_dict(read_meta(open_store(root).fetch(steps[-1] if step is None else step))["config"])
        location = args.checkpoint
    cfg, note = decoding_config(cfg.with_overrides(list(args.overrides)))
    sampling = Sampling.from_config(cfg, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    prompt_ids = tokenizer.encode(args.prompt)
    sampling.check(len(prompt_ids), cfg.train.seq_len)  # before any work
    if note:
        say(note)
    run = build_run(cfg, data=False)
    state, _, where = restore_train_state(location, run.setup.abstract, run.setup.shardings, cfg, say)
    say(f"generating from {where} (step {int(state.step)}) on {len(run.devices)} device(s)")
    text = tokenizer.decode(generate_tokens(cfg, run.rules, state.params, prompt_ids, sampling))
    print(args.prompt + text)
    return 0
