"""The `picotron-jax` command: train, bench, tokenizer.

Exit codes: 0 success, 2 user error (message on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from picotron_jax.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML preset, e.g. meshes/single.yaml (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picotron-jax", description="4D-parallel LLM training on a JAX mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--run-dir", help="where config.yaml and metrics.jsonl go (default: logging.run_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this run")

    p = sub.add_parser("bench", help="time the train step: tokens/s, MFU, memory, collectives (JSON)")
    _add_config_args(p)
    p.add_argument("--json", dest="json_out", help="also write the JSON result to this file")
    p.add_argument("--peak", action="store_true", help="measure this device's f32 matmul peak and cache it")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer.json on the configured corpus")
    _add_config_args(p)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    return parser


def _load(args):
    from picotron_jax.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from picotron_jax.trainer import train

    cfg = _load(args)
    run_dir = Path(args.run_dir or cfg.logging.run_dir)
    cfg.logging.run_dir = str(run_dir)
    summary = train(cfg, run_dir, resume=args.resume)
    return 130 if summary.stopped_early == "SIGINT" else 0


def cmd_bench(args) -> int:
    from picotron_jax.bench import bench_peak, bench_step

    result = bench_peak() if args.peak else bench_step(_load(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    return 0


def cmd_tokenizer(args) -> int:
    from picotron_jax.data import train_bpe_tokenizer

    cfg = _load(args)
    path = train_bpe_tokenizer(cfg.data, args.vocab_size, args.out)
    print(f"wrote {path}; train with data.tokenizer={path} model.vocab_size={args.vocab_size}")
    return 0


COMMANDS = {"train": cmd_train, "bench": cmd_bench, "tokenizer": cmd_tokenizer}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come before or after options
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
