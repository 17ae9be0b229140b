"""bench-32m in picotron_jax against the same model and optimizer in PyTorch, side by side in one run.

The PyTorch side is Hugging Face transformers' `LlamaForCausalLM` (SDPA attention, untied head) with
`torch.optim.AdamW` in fp32, AdamW's hyper-parameters, weight-decay mask (no decay on norms), global-norm
clip and warmup + cosine schedule as `meshes/bench-32m.yaml` resolves them. Each framework runs in its own
long-lived worker process that compiles / builds once; the parent then interleaves rounds
(jax, torch, jax, torch, ...), and in each round a worker measures its own f32 4096² matmul peak right
before its timed steps, so both see the same machine load. Both use every core: XLA:CPU's default pool
and `torch.set_num_threads(os.cpu_count())`. MFU is model FLOPs (DESIGN.md's 6·N + 6·L·T·d) against the
JAX peak of the same round (and, for torch, also against its own peak).

Usage: .venv/bin/python benchmarks/vs_torch.py [--rounds 3 --steps 4 --warmup 2 --config meshes/bench-32m.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_N = 4096


def _load_cfg(path: str, overrides: list[str]):
    from picotron_jax.config import load_config

    return load_config(path, overrides)


def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp

    from picotron_jax.observe.flops import flops_per_token
    from picotron_jax.run import build_run
    from picotron_jax.train.state import init_train_state

    cfg = _load_cfg(args.config, args.override)
    run = build_run(cfg)
    state = init_train_state(cfg, run.setup)
    t0 = time.perf_counter()
    step = run.train_step.lower(state, run.batch(0)).compile()
    compile_s = time.perf_counter() - t0
    a = jax.random.normal(jax.random.key(0), (PEAK_N, PEAK_N), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (PEAK_N, PEAK_N), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    _emit({"ready": True, "compile_s": compile_s, "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len)})
    i = 0
    for line in sys.stdin:
        warmup, steps = json.loads(line)
        best = float("inf")
        for _ in range(args.peak_repeats):
            t0 = time.perf_counter()
            mm(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        times = []
        for k in range(warmup + steps):
            batch = run.batch(i)
            i += 1
            jax.block_until_ready(batch)
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            if k >= warmup:
                times.append(time.perf_counter() - t0)
        _emit({"peak_flops": 2.0 * PEAK_N**3 / best, "step_s": statistics.median(times), "step_s_all": times,
               "loss": float(metrics["loss"])})


def torch_worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from picotron_jax.train.optimizer import NO_DECAY_MARKERS, lr_schedule

    cfg = _load_cfg(args.config, args.override)
    m, o, t = cfg.model, cfg.optimizer, cfg.train
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(cfg.train.seed)
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                     num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                     num_key_value_heads=m.num_kv_heads, head_dim=m.resolved_head_dim,
                     max_position_embeddings=t.seq_len, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
                     tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, attention_bias=False,
                     mlp_bias=False, use_cache=False)
    model = LlamaForCausalLM(hf).to(torch.float32)
    model.config._attn_implementation = "sdpa"
    model.train()
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in NO_DECAY_MARKERS)]
    no_decay = [p for n, p in model.named_parameters() if any(k in n for k in NO_DECAY_MARKERS)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, foreach=True)
    schedule = lr_schedule(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / o.lr)
    gen = torch.Generator().manual_seed(cfg.train.seed)

    def train_step():
        tokens = torch.randint(0, m.vocab_size, (t.global_batch, t.seq_len), generator=gen)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    a = torch.randn(PEAK_N, PEAK_N)
    b = torch.randn(PEAK_N, PEAK_N)
    torch.mm(a, b)
    _emit({"ready": True, "params": sum(p.numel() for p in model.parameters())})
    for line in sys.stdin:
        warmup, steps = json.loads(line)
        best = float("inf")
        for _ in range(args.peak_repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        times = []
        for k in range(warmup + steps):
            t0 = time.perf_counter()
            loss = train_step()
            if k >= warmup:
                times.append(time.perf_counter() - t0)
        _emit({"peak_flops": 2.0 * PEAK_N**3 / best, "step_s": statistics.median(times), "step_s_all": times,
               "loss": loss})


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, kind: str, args):
        cmd = [sys.executable, __file__, "--worker", kind, "--config", args.config,
               "--peak-repeats", str(args.peak_repeats), *sum((["--override", ov] for ov in args.override), [])]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "XLA_FLAGS": ""}
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.kind} worker died (exit {self.proc.wait()}); its error is above")
        return json.loads(line)

    def round(self, warmup: int, steps: int) -> dict:
        self.proc.stdin.write(json.dumps([warmup, steps]) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "meshes" / "bench-32m.yaml"))
    p.add_argument("--override", action="append", default=[], help="a.b=c config override (both frameworks)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and framework")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps in the first round (1 in the later ones)")
    p.add_argument("--peak-repeats", type=int, default=3, help="best of this many 4096² matmuls per round")
    p.add_argument("--json", default="", help="also write every round's figures to this file")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        (jax_worker if args.worker == "jax" else torch_worker)(args)
        return

    cfg = _load_cfg(args.config, args.override)
    tokens = cfg.train.global_batch * cfg.train.seq_len
    workers = {"jax": Worker("jax", args), "torch": Worker("torch", args)}
    fpt = workers["jax"].info["flops_per_token"]
    print(f"{Path(args.config).name}: {tokens} tokens/step, {fpt / 1e6:.1f} MFLOP/token, jax compile "
          f"{workers['jax'].info['compile_s']:.1f} s, torch params {workers['torch'].info['params'] / 1e6:.1f}M")
    rows = []
    for r in range(args.rounds):
        res = {k: w.round(args.warmup if r == 0 else 1, args.steps) for k, w in workers.items()}
        jp = res["jax"]["peak_flops"]
        row = {"round": r + 1}
        for k, x in res.items():
            tps = tokens / x["step_s"]
            row[k] = {**x, "tokens_per_s": tps, "mfu": tps * fpt / jp, "mfu_own_peak": tps * fpt / x["peak_flops"]}
        row["ratio"] = row["jax"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        rows.append(row)
        print(f"round {r + 1}: peak GFLOP/s jax {jp / 1e9:.0f} torch {res['torch']['peak_flops'] / 1e9:.0f} | "
              f"jax {row['jax']['tokens_per_s']:.0f} tok/s MFU {100 * row['jax']['mfu']:.1f}% loss "
              f"{row['jax']['loss']:.3f} | torch {row['torch']['tokens_per_s']:.0f} tok/s MFU "
              f"{100 * row['torch']['mfu']:.1f}% (own peak {100 * row['torch']['mfu_own_peak']:.1f}%) loss "
              f"{row['torch']['loss']:.3f} | jax/torch {row['ratio']:.2f}x", flush=True)
    for w in workers.values():
        w.close()
    med = lambda f: statistics.median(f(row) for row in rows)  # noqa: E731
    print("\n| | jax | torch |\n|---|---|---|")
    print(f"| matmul peak 4096² f32, GFLOP/s | {med(lambda r: r['jax']['peak_flops']) / 1e9:.0f} | "
          f"{med(lambda r: r['torch']['peak_flops']) / 1e9:.0f} |")
    print(f"| tokens/s | {med(lambda r: r['jax']['tokens_per_s']):.0f} | {med(lambda r: r['torch']['tokens_per_s']):.0f} |")
    print(f"| MFU vs the round's JAX peak | {100 * med(lambda r: r['jax']['mfu']):.1f}% | "
          f"{100 * med(lambda r: r['torch']['mfu']):.1f}% |")
    print(f"| MFU vs own peak | {100 * med(lambda r: r['jax']['mfu_own_peak']):.1f}% | "
          f"{100 * med(lambda r: r['torch']['mfu_own_peak']):.1f}% |")
    print(f"\nmedian jax/torch tokens/s ratio: {med(lambda r: r['ratio']):.2f}x over {len(rows)} rounds")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
