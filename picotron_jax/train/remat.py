"""Rematerialisation (activation checkpointing) policies for the scanned decoder layers.

The backward pass needs each layer's intermediate activations. `none` keeps them all; `full`
keeps only each layer's input and recomputes the layer in the backward pass (Chen et al. 2016:
one extra forward, activation memory per layer down to one [B, T, D] tensor); the others keep
some and recompute the rest, as Megatron's selective recomputation (Korthikanti et al. 2022)
and MaxText's named policies do. The names are the `checkpoint_name` tags of
`models/llama.py:decoder_block`: attn_norm, wq, wk, wv, attention, wo, mlp_norm, w_gate, w_up,
w_down.

| memory.remat | kept for the backward pass | recomputed |
|---|---|---|
| none | everything | nothing |
| full | the layer input | the whole layer |
| dots | every matmul output without batch dimensions (projections; not attention scores) | norms, rotary, softmax, SwiGLU |
| save_qkv | q, k, v projections | attention, output projection, MLP |
| save_attn | q, k, v, attention output, output projection | the MLP |
| names | the tags in memory.remat_names | the rest |
| offload_attn | as save_attn, but in pinned host memory (on XLA:CPU host and device memory are one) | the MLP |

Per-layer choice: `memory.remat="full:6,none:2"` runs the first six layers with `full` and the
last two with `none`, as two scans (early layers hold their activations longest).

Rematerialised layers are scanned one layer per iteration, whatever `model.scan_unroll` says: in
an unrolled scan XLA schedules the recomputation right after the forward pass, so the recomputed
activations are all alive at once and nothing is saved (bench-32m on XLA:CPU, full remat: 1,387 ->
1,299 MiB of temporaries with 8 layers unrolled, 1,396 -> 333 MiB with one layer per iteration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax

from picotron_jax.config import Config
from picotron_jax.config_checks import parse_remat
from picotron_jax.models.llama import scan_layers

ATTENTION_TAGS = ("wq", "wk", "wv", "attention", "wo")


def checkpoint_policy(name: str, remat_names: tuple[str, ...] = ()) -> Callable | None:
    """A jax.checkpoint policy for a `memory.remat` policy name; None = do not remat."""
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return cp.nothing_saveable
    if name == "dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "save_qkv":
        return cp.save_only_these_names("wq", "wk", "wv")
    if name == "save_attn":
        return cp.save_only_these_names(*ATTENTION_TAGS)
    if name == "names":
        return cp.save_only_these_names(*remat_names)
    if name == "offload_attn":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(ATTENTION_TAGS),
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(name)  # config validation lists the valid names


def remat_segments(cfg: Config) -> list[tuple[str, int]]:
    return parse_remat(cfg.memory.remat, cfg.model.num_layers)


def make_layer_stack(cfg: Config) -> Callable | None:
    """`layer_stack(block, x, stacked, unroll)` for Llama.hidden_states; None = the plain scan."""
    return segments_layer_stack(tuple(remat_segments(cfg)), _remat_names(cfg))


def stage_layer_stacks(cfg: Config, num_stages: int) -> list[Callable | None]:
    """The layer stack of each of `num_stages` pipeline stages of equal size (parallel/pipeline.py): the
    policy segments cut to the stage's layers. Stages with the same segments get the same function."""
    per_stage = cfg.model.num_layers // num_stages
    layer_policy = [name for name, count in remat_segments(cfg) for _ in range(count)]
    stacks: dict[tuple, Callable | None] = {}
    out = []
    for s in range(num_stages):
        segments: list[list] = []
        for name in layer_policy[s * per_stage:(s + 1) * per_stage]:
            if segments and segments[-1][0] == name:
                segments[-1][1] += 1
            else:
                segments.append([name, 1])
        key = tuple((name, count) for name, count in segments)
        if key not in stacks:
            stacks[key] = segments_layer_stack(key, _remat_names(cfg))
        out.append(stacks[key])
    return out


def _remat_names(cfg: Config) -> tuple[str, ...]:
    return tuple(x.strip() for x in cfg.memory.remat_names.split(",") if x.strip())


def segments_layer_stack(segments: tuple[tuple[str, int], ...], names: tuple[str, ...]) -> "LayerStack | None":
    """The layer stack that runs `segments` ((policy, layer count), ... in layer order); None = plain scan."""
    if all(name == "none" for name, _ in segments):
        return None
    return LayerStack(segments, names)


@dataclass(frozen=True)
class LayerStack:
    """`layer_stack(block, x, stacked, unroll)`: one scan per segment, its block under the segment's
    policy. Equal segments give equal (hashable) stacks: pipeline stages with the same policies share
    one branch of the stage program (parallel/pipeline.py)."""

    segments: tuple[tuple[str, int], ...]
    names: tuple[str, ...]

    def __call__(self, block, x_BTD, stacked, unroll):
        total, start = sum(count for _, count in self.segments), 0
        for name, count in self.segments:
            part = stacked if count == total else jax.tree.map(lambda a: a[start:start + count], stacked)
            x_BTD = scan_layers(self._remat(name, block), x_BTD, part, min(unroll, count) if name == "none" else 1)
            start += count
        return x_BTD

    def remat_block(self, block: Callable) -> Callable:
        """`block` under the one policy of the whole stack: how the MoE mixed stack (models/moe_layers.py),
        which scans groups of layers rather than layer ranges, applies remat. Config validation refuses
        per-layer segments on MoE models."""
        (name,) = {name for name, _ in self.segments}
        return self._remat(name, block)

    def _remat(self, name: str, block: Callable) -> Callable:
        if name == "none":
            return block
        return jax.checkpoint(block, policy=checkpoint_policy(name, self.names), prevent_cse=False)
