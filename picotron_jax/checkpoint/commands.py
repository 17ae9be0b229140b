"""The `ckpt` and `export` subcommands of `picotron-jax` (registered by cli.py)."""

from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("ckpt", help="list a checkpoint folder's steps, or describe and verify one step")
    p.add_argument("action", choices=("ls", "info"), help="ls: every step (metadata only); info: one step, verified")
    p.add_argument("path", help="a checkpoint folder (RUN_DIR/checkpoints, gs://..., s3://...) or one step's folder")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face Llama folder",
                       description="picotron-jax export --checkpoint RUN/checkpoints/100 --to hf OUT [--dtype bfloat16]")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (newest good step) or one step's folder")
    p.add_argument("--to", nargs=2, required=True, metavar=("hf", "PATH"), help="format and output folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights")


def cmd_ckpt(args) -> int:
    from picotron_jax.checkpoint.inspect import format_info, format_table, list_steps, step_info

    result = list_steps(args.path) if args.action == "ls" else step_info(args.path)
    if args.as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_table(result) if args.action == "ls" else format_info(result))
    return 0 if args.action == "ls" or result["valid"] else 1


def cmd_export(args) -> int:
    from picotron_jax.checkpoint.hf import export_to_hf
    from picotron_jax.checkpoint.restore import split_location
    from picotron_jax.checkpoint.storage import open_store
    from picotron_jax.errors import UserError

    kind, out = args.to
    if kind != "hf":
        raise UserError(f"--to {kind!r}: the only supported export format is 'hf' (--to hf PATH)")
    root, step = split_location(args.checkpoint)
    store = open_store(root)
    steps = store.steps()
    if step is None and not steps:
        raise UserError(f"no checkpoint in {root}")
    if step is not None and step not in steps:
        raise UserError(f"no checkpoint at step {step} in {root} (steps there: {', '.join(map(str, steps)) or 'none'})")
    step = steps[-1] if step is None else step
    path = export_to_hf(store.fetch(step), Path(out), args.dtype)
    print(f"wrote {path}/config.json and model.safetensors ({args.dtype}) from {store.describe(step)}")
    return 0


COMMANDS = {"ckpt": cmd_ckpt, "export": cmd_export}
