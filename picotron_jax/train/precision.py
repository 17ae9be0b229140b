"""Mixed precision: jmp-style policies with per-module compute dtypes, and dynamic loss scaling.

A policy has three dtypes (Micikevicius et al. 2018, "Mixed Precision Training"; DeepMind's jmp):
parameters (fp32 master weights, what the optimizer updates), compute (the residual stream and
every module without an override) and output (logits and loss, always fp32). Modules are named
after the model's parts (`MODULES`); `precision.overrides` and `precision.policy_file` (written by
`picotron-jax precision analyze`) give single modules another compute dtype. A module computes in
its dtype (inputs, weights, weight gradients) and hands its output back in the stream's dtype.

fp16 has a narrow range (max 65504), so its gradients are scaled: the loss is multiplied by S
before the backward pass and the gradients divided by S after it. A step whose gradients are not
finite is skipped and S halved; after `loss_scale_growth_interval` finite steps S doubles. Each
overflow is attributed to the module nearest the loss whose weight gradient is not finite, and a
module that overflows `promote_after` times is promoted to fp32 (trainer.py rebuilds the step).
The scale and the per-module counts live in the TrainState, so checkpoints carry them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from picotron_jax.config import Config
from picotron_jax.config_checks import DTYPE_NAMES, parse_precision_overrides
from picotron_jax.errors import UserError
from picotron_jax.models.llama import LAYER_PARAMS

MODE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Module names, in forward order. "layers.attention" is the softmax(q k^T) v core; "head" is the
# LM head with the cross-entropy (logits are always accumulated in fp32).
MODULES: tuple[str, ...] = (
    "embed", *(f"layers.{name}" for name in LAYER_PARAMS), "layers.attention", "final_norm", "head",
)
# Norms compute in fp32 whatever the mode (their statistics need the range); an override to another dtype
# computes the whole norm, scale included, in that dtype (models/llama.py:rms_norm).
NORM_MODULES: tuple[str, ...] = ("layers.attn_norm", "layers.mlp_norm", "final_norm")
PARAM_OF_MODULE = {"embed": ("embed",), "final_norm": ("final_norm",), "head": ("lm_head",),
                   **{f"layers.{name}": ("layers", name) for name in LAYER_PARAMS}}


@dataclass(frozen=True)
class PrecisionPolicy:
    mode: str  # resolved: fp32 | bf16 | fp16
    reason: str  # why this mode (auto) - logged at start-up
    compute_dtype: str  # residual stream and default module dtype
    module_dtypes: tuple[tuple[str, str], ...] = ()  # (module, dtype) where it differs from default_of(module)
    param_dtype: str = "float32"
    output_dtype: str = "float32"
    promoted: tuple[str, ...] = ()  # modules promoted to fp32 after repeated overflow

    @property
    def loss_scaling(self) -> bool:
        return self.mode == "fp16"

    def default_of(self, module: str) -> str:
        """A module's dtype without an override: fp32 for norms, the compute dtype for the rest."""
        return "float32" if module in NORM_MODULES else self.compute_dtype

    def dtype_of(self, module: str) -> jnp.dtype:
        return jnp.dtype(dict(self.module_dtypes).get(module, self.default_of(module)))

    def model_dtypes(self) -> dict[str, jnp.dtype]:
        """Module -> dtype for the modules that differ from their default (models/llama.py)."""
        return {m: jnp.dtype(d) for m, d in self.module_dtypes}

    def with_modules(self, dtypes: dict[str, str], promoted: tuple[str, ...] = ()) -> "PrecisionPolicy":
        merged = dict(self.module_dtypes) | dtypes
        kept = tuple((m, d) for m in MODULES if (d := merged.get(m, self.default_of(m))) != self.default_of(m))
        return replace(self, module_dtypes=kept, promoted=tuple(sorted(set(self.promoted) | set(promoted))))

    def describe(self) -> str:
        special = ", ".join(f"{m}={jnp.dtype(d).name}" for m, d in self.module_dtypes)
        norms = "" if self.compute_dtype == "float32" else "; norms fp32"
        return f"precision {self.mode} ({self.reason}){norms}" + (f"; modules: {special}" if special else "")


def auto_mode(devices: list) -> tuple[str, str]:
    """bf16 where the hardware has fast bf16 (TPU, NVIDIA compute capability >= 8.0, ROCm),
    fp16 + loss scaling on older NVIDIA GPUs, fp32 on CPU."""
    d = devices[0]
    if d.platform == "cpu":
        return "fp32", "auto: XLA:CPU has no fast bf16/fp16 matmuls"
    if d.platform == "tpu":
        return "bf16", f"auto: {d.device_kind} computes bf16 natively"
    capability = getattr(d, "compute_capability", None)
    if d.platform in ("gpu", "cuda") and capability:
        if float(capability) >= 8.0:
            return "bf16", f"auto: {d.device_kind} (compute capability {capability} >= 8.0) has bf16 tensor cores"
        return "fp16", f"auto: {d.device_kind} (compute capability {capability} < 8.0) has fp16 but no bf16 tensor cores"
    return "bf16", f"auto: {d.platform} device {d.device_kind}"


def read_policy_file(path: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"config field 'precision.policy_file' = {path!r}: cannot read it ({exc})") from None
    modules = raw.get("modules") if isinstance(raw, dict) else None
    if not isinstance(modules, dict) or raw.get("mode") not in MODE_DTYPES:
        raise UserError(f"config field 'precision.policy_file' = {path!r}: expected a YAML mapping with mode "
                        f"(fp32|bf16|fp16) and modules (module: dtype), as `picotron-jax precision analyze` writes")
    for module, dtype in modules.items():
        if module not in MODULES or str(dtype) not in DTYPE_NAMES:
            raise UserError(f"config field 'precision.policy_file' = {path!r}: entry {module}: {dtype} - modules are "
                            f"{', '.join(MODULES)}; dtypes {', '.join(DTYPE_NAMES)}")
    return {"mode": raw["mode"], "modules": {m: DTYPE_NAMES[str(d)] for m, d in modules.items()}}


def resolve_policy(cfg: Config, devices: list, promoted: tuple[str, ...] = ()) -> PrecisionPolicy:
    """The run's policy: mode (auto resolved), then the policy file, then precision.overrides."""
    p = cfg.precision
    file = read_policy_file(p.policy_file) if p.policy_file else None
    mode, reason = p.mode, f"precision.mode={p.mode}"
    if mode == "auto":
        if cfg.train.dtype == "bfloat16":
            mode, reason = "bf16", "train.dtype=bfloat16"
        elif file is not None:
            mode, reason = file["mode"], f"mode of {p.policy_file}"
        else:
            mode, reason = auto_mode(devices)
    policy = PrecisionPolicy(mode=mode, reason=reason, compute_dtype=MODE_DTYPES[mode])
    dtypes = dict(file["modules"]) if file else {}
    for pattern, dtype in parse_precision_overrides(p.overrides):
        matched = fnmatch.filter(MODULES, pattern)
        if not matched:
            raise UserError(f"config field 'precision.overrides' = {p.overrides!r}: pattern {pattern!r} matches no "
                            f"module; modules are {', '.join(MODULES)}")
        dtypes.update({m: dtype for m in matched})
    dtypes.update({m: "float32" for m in promoted})
    if devices[0].platform == "cpu" and jnp.dtype(dtypes.get("layers.attention", policy.compute_dtype)) == jnp.float16:
        # jax.nn.dot_product_attention asks for f16 x f16 -> f32 dots, which XLA:CPU does not have
        dtypes["layers.attention"] = "float32"
        policy = replace(policy, reason=policy.reason + "; attention in fp32 on XLA:CPU (no f16 dots with f32 sums)")
    return policy.with_modules(dtypes, promoted)


def matmul_precision(cfg: Config) -> str | None:
    """jax.default_matmul_precision value: 'high' allows TF32-class f32 matmuls, 'highest' forbids them."""
    return None if cfg.precision.matmul == "default" else cfg.precision.matmul


# ----------------------------------------------------------------------------- loss scaling


@flax.struct.dataclass
class LossScaleState:
    scale: jax.Array  # f32 []: the loss is multiplied by it before the backward pass
    good_steps: jax.Array  # int32 []: finite steps since the scale last changed
    skipped: jax.Array  # int32 []: steps skipped so far (non-finite gradients)
    module_overflows: jax.Array  # int32 [len(MODULES)]: overflows attributed to each module


def init_loss_scale(cfg: Config) -> LossScaleState:
    return LossScaleState(
        scale=jnp.asarray(cfg.precision.loss_scale_init, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        module_overflows=jnp.zeros((len(MODULES),), jnp.int32),
    )


def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def overflow_origin(grads: Any) -> jax.Array:
    """int32 []: index in MODULES of the module nearest the loss whose weight gradient is not finite
    (-1 if all are finite). A non-finite value spreads backwards, to every module before its origin:
    walk from the loss (head, final norm, last layer's w_down, ...) to the embedding."""
    flags, owners = [], []
    for module in ("head", "final_norm"):
        g = _grad_of(grads, module)
        if g is not None:
            flags.append(~jnp.all(jnp.isfinite(g))[None])
            owners.append(np.array([MODULES.index(module)]))
    layer_modules = [m for m in reversed(MODULES) if m.startswith("layers.") and m in PARAM_OF_MODULE]
    per_layer = [~jnp.all(jnp.isfinite(g), axis=tuple(range(1, g.ndim)))  # [L]
                 for g in (_grad_of(grads, m) for m in layer_modules)]
    L = per_layer[0].shape[0]
    flags.append(jnp.stack(per_layer, axis=1)[::-1].reshape(-1))  # last layer first, modules nearest the loss first
    owners.append(np.tile([MODULES.index(m) for m in layer_modules], L))
    flags.append(~jnp.all(jnp.isfinite(grads["embed"]))[None])
    owners.append(np.array([MODULES.index("embed")]))
    flag = jnp.concatenate(flags)
    owner = jnp.asarray(np.concatenate(owners), jnp.int32)
    return jnp.where(jnp.any(flag), owner[jnp.argmax(flag)], -1)


def _grad_of(grads: Any, module: str):
    node = grads
    for key in PARAM_OF_MODULE[module]:
        if key not in node:
            return None
        node = node[key]
    return node


def update_loss_scale(state: LossScaleState, finite: jax.Array, origin: jax.Array,
                      growth_interval: int) -> LossScaleState:
    """Halve on overflow (never below 1), double after `growth_interval` finite steps in a row."""
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= growth_interval
    scale = jnp.where(finite, jnp.where(grow, state.scale * 2.0, state.scale), jnp.maximum(state.scale / 2.0, 1.0))
    counts = state.module_overflows.at[jnp.maximum(origin, 0)].add(jnp.where(origin >= 0, 1, 0))
    return LossScaleState(scale=scale, good_steps=jnp.where(grow, 0, good),
                          skipped=state.skipped + jnp.where(finite, 0, 1), module_overflows=counts)


def modules_to_promote(policy: PrecisionPolicy, counts: Any, promote_after: int) -> tuple[str, ...]:
    """Modules with at least `promote_after` attributed overflows that do not run in fp32 yet."""
    if promote_after <= 0 or not policy.loss_scaling:
        return ()
    counts = np.asarray(counts)
    return tuple(m for i, m in enumerate(MODULES)
                 if counts[i] >= promote_after and policy.dtype_of(m) != jnp.float32)
