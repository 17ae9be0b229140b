"""Checkpoint codecs on trained states: bytes on disk / raw per codec and per array kind, save and restore time.

Each `--from STEP_DIR` is a lossless checkpoint of a trained run (its config comes from its metadata). It
is restored once, then saved synchronously with every fixed codec, with `auto`, and with `auto` plus
`checkpoint.quantize_optimizer` bf16 / int8, each into a fresh scratch folder: the save is timed until the
checkpoint is complete (for `auto` this includes measuring the candidates; that part is also reported),
then a restore onto the same mesh is timed. Variants run interleaved, `--repeats` rounds; every figure is
a median (the host is shared and noisy). Ratios are bytes on disk / raw bytes of the fp32 train state
(per kind: the chunks of that kind's arrays; total: the whole folder, metadata included). `--layout
NAME:mesh.data=4,mesh.tensor=2` also reshards the first state onto that mesh (more, smaller chunks: one per
device shard) and saves it with zstd, blosc-zstd and auto.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python benchmarks/checkpoint_codecs.py \
        --from RUN/checkpoints/300 [--from ...] [--layout ...] --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import jax

from picotron_jax.checkpoint.codecs import KINDS, array_kind
from picotron_jax.checkpoint.manager import Checkpointer, state_tree
from picotron_jax.checkpoint.metadata import leaf_names
from picotron_jax.checkpoint.restore import read_meta, restore_train_state
from picotron_jax.config import _merge, config_from_dict, parse_overrides
from picotron_jax.run import build_run

VARIANTS = {  # name -> checkpoint settings
    "none": {"codec": "none"}, "lz4": {"codec": "lz4"}, "blosc-lz4": {"codec": "blosc-lz4"},
    "zstd": {"codec": "zstd"}, "blosc-zstd": {"codec": "blosc-zstd"}, "auto": {"codec": "auto"},
    "auto + bf16 moments": {"codec": "auto", "quantize_optimizer": "bf16"},
    "auto + int8 moments": {"codec": "auto", "quantize_optimizer": "int8"},
}
LAYOUT_VARIANTS = ("zstd", "blosc-zstd", "auto")


def raw_by_kind(tree) -> dict[str, int]:
    out = {k: 0 for k in KINDS}
    for name, x in zip(leaf_names(tree), jax.tree.leaves(tree)):
        out[array_kind(name)] += math.prod(x.shape) * x.dtype.itemsize
    return out


def measure(state, cfg, abstract, shardings, variants: dict, scratch: Path, repeats: int, level: int,
            mesh: str) -> dict:
    """Median bytes per kind, total, save and restore seconds of each variant (interleaved rounds)."""
    raw = raw_by_kind(state_tree(state))
    total_raw = sum(raw.values())
    samples: dict[str, dict[str, list]] = {v: {} for v in variants}
    for r in range(repeats + 1):  # round 0 warms up (TensorStore contexts, the quantisation's compilation)
        for name, settings in variants.items():
            c = cfg.replace(checkpoint={**settings, "async_save": False, "keep": 0, "every": 1,
                                        "compression_level": level})
            folder = scratch / f"{name.replace(' ', '_')}-{r}"
            shutil.rmtree(folder, ignore_errors=True)
            ckpt = Checkpointer(folder, c, say=lambda _m: None)
            t0 = time.perf_counter()
            ckpt.save(state, {"mesh": mesh})
            ckpt.close()
            save_s = time.perf_counter() - t0
            written = read_meta(folder / str(int(state.step)))
            on_disk = ckpt.store.bytes_on_disk(int(state.step))
            t0 = time.perf_counter()
            restored, _, _ = restore_train_state(str(folder), abstract, shardings, c)
            jax.block_until_ready(restored)
            restore_s = time.perf_counter() - t0
            del restored
            shutil.rmtree(folder, ignore_errors=True)
            if r == 0:
                continue
            row = samples[name]
            comp = written["compression"]
            for key, value in (("bytes_on_disk", on_disk), ("save_s", save_s), ("restore_s", restore_s),
                               ("selection_s", (comp.get("selection") or {}).get("seconds", 0.0)),
                               *((f"bytes_{k}", v["bytes"]) for k, v in comp["by_kind_bytes"].items())):
                row.setdefault(key, []).append(value)
            row["kinds"] = comp["kinds"]
    out = {}
    for name, row in samples.items():
        med = {k: statistics.median(v) for k, v in row.items() if k != "kinds"}
        out[name] = {
            "ratio": round(med["bytes_on_disk"] / total_raw, 4), "bytes_on_disk": int(med["bytes_on_disk"]),
            "by_kind": {k: round(med.get(f"bytes_{k}", 0) / raw[k], 4) if raw[k] else None for k in KINDS},
            "save_s": round(med["save_s"], 3), "restore_s": round(med["restore_s"], 3),
            "selection_s": round(med["selection_s"], 3), "codecs": row["kinds"]}
    return out


def one_state(step_dir: Path, scratch: Path, repeats: int, level: int, layouts: list[str]) -> dict:
    meta = read_meta(step_dir)
    cfg = config_from_dict(meta["config"])
    run = build_run(cfg, data=False)
    state, _, _ = restore_train_state(str(step_dir), run.setup.abstract, run.setup.shardings, cfg)
    jax.block_until_ready(state)
    raw = raw_by_kind(state_tree(state))
    result = {"checkpoint": str(step_dir), "config": meta["config"]["model"], "step": int(state.step),
              "params": run.setup.spec.num_params(), "raw_bytes": sum(raw.values()), "raw_by_kind": raw,
              "variants": measure(state, cfg, run.setup.abstract, run.setup.shardings, VARIANTS, scratch, repeats,
                                  level, meta.get("mesh")),
              "layouts": {}}
    for layout in layouts:  # 'name:mesh.data=4,mesh.tensor=2': the same state resharded, then saved
        name, _, overrides = layout.partition(":")
        other = config_from_dict(_merge(cfg.to_dict(), parse_overrides(overrides.split(","))))
        other_run = build_run(other, data=False)
        moved, _, _ = restore_train_state(str(step_dir), other_run.setup.abstract, other_run.setup.shardings, other)
        result["layouts"][name] = measure(moved, other, other_run.setup.abstract, other_run.setup.shardings,
                                          {k: VARIANTS[k] for k in LAYOUT_VARIANTS}, scratch, repeats, level, name)
    return result


def markdown(result: dict) -> str:
    lines = [f"{result['checkpoint']}: step {result['step']}, {result['params'] / 1e6:.2f}M parameters, "
             f"{result['raw_bytes'] / 2**20:.1f} MiB raw",
             "", "| variant | on disk / raw | params | first moments | second moments | counters | save s | restore s |"
             " codec per kind (params, mu, nu, counters) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        kinds = ", ".join(v["codecs"][k] for k in KINDS)
        lines.append(f"| {name} | **{v['ratio']:.3f}** | " + " | ".join(
            f"{v['by_kind'][k]:.3f}" if v["by_kind"][k] is not None else "-" for k in KINDS)
                     + f" | {v['save_s']:.2f} | {v['restore_s']:.2f} | {kinds} |")
    for layout, variants in result.get("layouts", {}).items():
        lines += ["", f"the same state on {layout}:", "", "| variant | on disk / raw | params | first moments | "
                  "second moments | counters | save s | restore s |", "|---|---|---|---|---|---|---|---|"]
        for name, v in variants.items():
            lines.append(f"| {name} | **{v['ratio']:.3f}** | " + " | ".join(
                f"{v['by_kind'][k]:.3f}" if v["by_kind"][k] is not None else "-" for k in KINDS)
                         + f" | {v['save_s']:.2f} | {v['restore_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="sources", action="append", required=True, help="a trained step folder")
    parser.add_argument("--scratch", default="/tmp/picotron-codec-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--layout", action="append", default=[],
                        help="also the first checkpoint resharded onto NAME:section.key=value,...")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    results = [one_state(Path(s).absolute(), Path(args.scratch), args.repeats, args.level, args.layout if i == 0 else [])
               for i, s in enumerate(args.sources)]
    for r in results:
        print(markdown(r) + "\n")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"repeats": args.repeats, "level": args.level,
                                                   "device": jax.devices()[0].platform, "results": results},
                                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
