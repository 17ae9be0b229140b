"""The monitor's step outputs (train/monitor_stats.py) as row fields of metrics.jsonl.

Every logged row: `param_norm`, `update_ratio` (update norm / parameter norm), and `update_skipped`
with `monitor.on_nan=skip`. On a per-layer step (`monitor.layer_every`): `layer_grad_norm`,
`layer_param_norm`, `layer_update_ratio`, lists of L floats (decoder layer 0 first); and, on the same
steps unless the step was only made a per-layer step by a non-finite gradient, `layer_act_rms` (each
layer's output RMS) and `layer_attn_logit_max` (its largest attention logit), measured in the forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LAYER_FIELDS = ("layer_grad_norm", "layer_param_norm", "layer_update_ratio")
ACTIVATION_FIELDS = ("layer_act_rms", "layer_attn_logit_max")


def row_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """Row fields from the step's metrics fetched to the host ({} with the monitor off)."""
    out: dict[str, Any] = {}
    if "param_norm" in metrics:
        out.update(param_norm=float(metrics["param_norm"]), update_ratio=float(metrics["update_ratio"]))
    if "update_skipped" in metrics:
        out["update_skipped"] = bool(metrics["update_skipped"])
    if bool(metrics.get("layer_stats_step", False)):
        out.update({k: [float(v) for v in np.asarray(metrics[k])] for k in LAYER_FIELDS})
    if bool(metrics.get("layer_act_step", False)):
        out.update({k: [float(v) for v in np.asarray(metrics[k])] for k in ACTIVATION_FIELDS})
    return out
