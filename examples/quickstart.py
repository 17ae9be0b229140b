"""The Python API in a script: load a preset, train, inspect the layout, evaluate, generate, change the
learning rate and train on. The same steps as notebooks/00_quickstart.ipynb.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python examples/quickstart.py [overrides]

Overrides are `section.key=value`, e.g. train.steps=100 mesh.tensor=4.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts

import picotron_jax as pj  # noqa: E402


def main(overrides: list[str]) -> pj.Summary:
    cfg = pj.load_config("tp2-dp4", ["train.steps=40", "train.seq_len=64", "logging.every=10",
                                     "eval.tokens=4096", "optimizer.warmup_steps=5", *overrides])
    with pj.Trainer(cfg) as trainer:  # no run_dir: nothing is written
        first = trainer.run(20)
        print(trainer.shardings())
        print("eval:", trainer.evaluate())
        print("sample:", repr(trainer.generate("def ", max_new_tokens=24)))
        trainer.reconfigure(optimizer={"lr": 1e-3})
        rest = trainer.run()
    print(f"loss {first.first_loss:.3f} -> {rest.final_loss:.3f}, eval loss {rest.eval_loss:.3f}")
    return rest


if __name__ == "__main__":
    main(sys.argv[1:])
