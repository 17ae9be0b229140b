"""The `picotron-jax` command: train, generate, bench, tokenizer, launch, ckpt, export, memory, precision,
pipeline-schedule, profile, data, learn, debug, meta, tune.

Exit codes: 0 success, 2 user error (message on stderr, no traceback), 3 another process of a
multi-process run was lost, failed or hung, 4 the run gave up (a non-finite loss), 5 a disk is full
(the previous checkpoint is intact), 130 interrupted (Ctrl-C; the step it stopped after is saved).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from picotron_jax.checkpoint import commands as checkpoint_commands
from picotron_jax.errors import DiskFull, RunAborted, UserError, is_disk_full


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML preset, e.g. meshes/single.yaml (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picotron-jax", description="4D-parallel LLM training on a JAX mesh")
    from picotron_jax import __version__

    parser.add_argument("--version", action="version", version=f"picotron-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--run-dir", help="where config.yaml and metrics.jsonl go (default: logging.run_dir; if that is "
                   "unset, a new runs/<preset>-<time> per run, with runs/latest linking the newest)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint of this run")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run directory that holds one: its old contents are moved aside")
    p.add_argument("--resume-from", metavar="PATH",
                   help="continue from a checkpoint folder (its newest good step) or one step's folder (DIR/<step>)")
    p.add_argument("--from", dest="init_from", nargs=2, metavar=("hf", "PATH"),
                   help="start from a Hugging Face Llama folder (config.json + model.safetensors)")

    p = sub.add_parser("bench", help="time the train step: tokens/s, MFU, memory, collectives (JSON)")
    _add_config_args(p)
    p.add_argument("--json", dest="json_out", help="also write the JSON result to this file")
    p.add_argument("--peak", action="store_true", help="measure this device's f32 matmul peak and cache it")

    p = sub.add_parser("pipeline-schedule", help="print the time x pipe-rank table of forwards/backwards a config runs")
    _add_config_args(p)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer.json on the configured corpus")
    _add_config_args(p)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="path of the tokenizer.json to write")

    p = sub.add_parser("launch", help="run N local processes as one multi-process run (coordinator on 127.0.0.1)",
                       description="picotron-jax launch -n 2 --devices-per-process 4 -- train --config meshes/dp8.yaml")
    p.add_argument("-n", "--num-processes", type=int, required=True, help="number of processes")
    p.add_argument("--devices-per-process", type=int, default=0,
                   help="virtual CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count); "
                        "0 keeps XLA_FLAGS as it is")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds after the first failure before the launcher kills what still runs "
                        "(default: distributed.heartbeat_timeout_s + 10)")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- train|bench ...",
                   help="the command every process runs, with its options and overrides")
    checkpoint_commands.add_parsers(sub)

    from picotron_jax.memory.command import add_parser as add_memory_parser

    add_memory_parser(sub, _add_config_args)
    from picotron_jax.analyze_precision import add_parser as add_precision_parser

    add_precision_parser(sub, _add_config_args)
    from picotron_jax.generate import add_parser as add_generate_parser

    add_generate_parser(sub)
    from picotron_jax.profile.command import add_parser as add_profile_parser

    add_profile_parser(sub, _add_config_args)
    from picotron_jax.data.commands import add_parser as add_data_parser

    add_data_parser(sub)
    from picotron_jax.tutorials.command import add_parser as add_learn_parser

    add_learn_parser(sub)
    from picotron_jax.debug.command import add_parser as add_debug_parser

    add_debug_parser(sub)
    from picotron_jax.meta.command import add_parser as add_meta_parser

    add_meta_parser(sub, _add_config_args)
    from picotron_jax.tune.command import add_parser as add_tune_parser

    add_tune_parser(sub, _add_config_args)
    from picotron_jax.observe.plots import add_parser as add_plot_parser

    add_plot_parser(sub)
    from picotron_jax.observe.dashboard import add_parser as add_dashboard_parser

    add_dashboard_parser(sub)
    return parser


def _load(args):
    from picotron_jax.config import load_config

    return load_config(args.config, args.overrides)


def _cluster(cfg):
    """Join the other processes of a multi-process run (before any JAX device use); a no-op otherwise."""
    from picotron_jax.distributed import initialize

    return initialize(cfg.distributed)


def cmd_train(args) -> int:
    """A thin wrapper over the Python API: `Trainer(cfg, run_dir).run()` (trainer.py)."""
    from picotron_jax import rundir

    cfg = _load(args)
    auto = not args.run_dir and cfg.logging.run_dir == rundir.DEFAULT  # each run its own folder, runs/latest links it
    run_dir = Path(args.run_dir or cfg.logging.run_dir)
    from picotron_jax.observe.memory import apply_allocator_settings

    if warning := apply_allocator_settings(cfg.memory):
        print(f"warning: {warning}", file=sys.stderr)
    init_from_hf = _hf_source(args, cfg)
    with _cluster(cfg) as cluster:
        from picotron_jax.trainer import Trainer

        if auto:  # the same new folder on every process: process 0 picks it
            run_dir = rundir.default_run_dir(args.config, args.resume, shared=cluster.num_processes > 1)
        cfg.logging.run_dir = str(run_dir)
        trainer = Trainer(cfg, run_dir, callbacks=[cluster.callback()], resume=args.resume,
                          resume_from=args.resume_from, init_from_hf=init_from_hf, overwrite=args.overwrite)
        if auto and cluster.process_id == 0 and (note := rundir.point_latest(run_dir)):
            print(note, file=sys.stderr)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
    return 130 if summary.stopped_early == "SIGINT" else 0


def _hf_source(args, cfg) -> str | None:
    """`--from hf PATH`: the model section comes from the folder's config.json (checkpoint/hf.py)."""
    if args.init_from is None:
        return None
    if args.resume or args.resume_from:
        raise UserError("--from hf starts a new run from a Hugging Face model; it cannot be combined with --resume "
                        "or --resume-from (a resumed run already has its weights)")
    from picotron_jax.checkpoint.hf import apply_hf_model_config

    return apply_hf_model_config(args.init_from, cfg)


def cmd_bench(args) -> int:
    from picotron_jax.bench import bench_peak, bench_step

    if args.peak:
        result = bench_peak()
    else:
        cfg = _load(args)
        with _cluster(cfg) as cluster:
            result = bench_step(cfg)
        if cluster.process_id != 0:  # one JSON result per run
            return 0
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    return 0


def cmd_pipeline_schedule(args) -> int:
    from picotron_jax.parallel.pipeline_schedule import render, schedule_of_config

    print(render(schedule_of_config(_load(args))))
    return 0


def cmd_tokenizer(args) -> int:
    from picotron_jax.data import train_bpe_tokenizer

    cfg = _load(args)
    path = train_bpe_tokenizer(cfg.data, args.vocab_size, args.out)
    print(f"wrote {path}; train with data.tokenizer={path} model.vocab_size={args.vocab_size}")
    return 0


def cmd_launch(args) -> int:
    from picotron_jax import rundir
    from picotron_jax.launch import launch

    command = list(args.command_args)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0] not in ("train", "bench"):
        raise UserError("launch needs the command every process runs, e.g. "
                        "picotron-jax launch -n 2 --devices-per-process 4 -- train --config meshes/dp8.yaml")
    child_args, extra = build_parser().parse_known_args(command)
    cfg = _load_child_config(child_args, extra)
    run_dir = Path(getattr(child_args, "run_dir", None) or cfg.logging.run_dir)
    if command[0] == "train" and not child_args.run_dir and cfg.logging.run_dir == rundir.DEFAULT:
        run_dir = rundir.default_run_dir(child_args.config, child_args.resume)  # one folder for all processes
        command = [command[0], "--run-dir", str(run_dir), *command[1:]]
    grace = args.grace if args.grace is not None else cfg.distributed.heartbeat_timeout_s + 10
    return launch(args.num_processes, command, run_dir, args.devices_per_process, grace)


def _load_child_config(args, extra: list[str]):
    from picotron_jax.config import load_config

    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        raise UserError(f"unrecognized arguments for {args.command}: {' '.join(unknown)}")
    return load_config(args.config, list(args.overrides) + extra)


def cmd_generate(args) -> int:
    from picotron_jax.generate import cmd_generate as run_generate

    return run_generate(args)


def cmd_memory(args) -> int:
    from picotron_jax.memory.command import cmd_memory as run_memory

    return run_memory(args, _load)


def cmd_precision(args) -> int:
    from picotron_jax.analyze_precision import cmd_precision as run_precision

    return run_precision(args, _load)


def cmd_data(args) -> int:
    from picotron_jax.data.commands import cmd_data as run_data

    return run_data(args)


def cmd_profile(args) -> int:
    from picotron_jax.profile.command import cmd_profile as run_profile

    return run_profile(args, _load)


def cmd_meta(args) -> int:
    from picotron_jax.meta.command import cmd_meta as run_meta

    return run_meta(args, _load)


COMMANDS = {"profile": cmd_profile, "train": cmd_train, "bench": cmd_bench, "tokenizer": cmd_tokenizer, "launch": cmd_launch,
            "memory": cmd_memory, "precision": cmd_precision, "pipeline-schedule": cmd_pipeline_schedule,
            "generate": cmd_generate}
COMMANDS.update(checkpoint_commands.COMMANDS)
COMMANDS["data"] = cmd_data


def cmd_learn(args) -> int:
    from picotron_jax.tutorials.command import cmd_learn as run_learn

    return run_learn(args)


COMMANDS["learn"] = cmd_learn


def cmd_debug(args) -> int:
    from picotron_jax.debug.command import cmd_debug as run_debug

    return run_debug(args)


COMMANDS["debug"] = cmd_debug
COMMANDS["meta"] = cmd_meta


def cmd_tune(args) -> int:
    from picotron_jax.tune.command import cmd_tune as run_tune

    return run_tune(args, _load)


COMMANDS["tune"] = cmd_tune


def cmd_plot(args) -> int:
    from picotron_jax.observe.plots import cmd_plot as run_plot

    return run_plot(args)


COMMANDS["plot"] = cmd_plot


def cmd_dashboard(args) -> int:
    from picotron_jax.observe.dashboard import cmd_dashboard as run_dashboard

    return run_dashboard(args)


COMMANDS["dashboard"] = cmd_dashboard


def _in_multiprocess_run() -> bool:
    return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


def _exit_code(code: int) -> int:
    """A failed process of a multi-process run leaves at once: waiting for the others at JAX's shutdown
    barrier could take shutdown_timeout_s while they wait for it in a collective."""
    if code != 0 and _in_multiprocess_run():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come before or after options
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return _exit_code(COMMANDS[args.command](args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _exit_code(2)
    except RunAborted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return _exit_code(exc.exit_code)
    except DiskFull as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _exit_code(exc.exit_code)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        print(f"error: disk full writing {exc.filename or 'a file'}: {exc.strerror or exc}; free space there "
              f"(or write elsewhere), then --resume", file=sys.stderr)
        return _exit_code(DiskFull.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _exit_code(130)
    except Exception:
        if _in_multiprocess_run():
            import traceback

            traceback.print_exc()
            _exit_code(1)
        raise


if __name__ == "__main__":
    sys.exit(main())
