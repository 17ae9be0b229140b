"""picotron_jax: 4D-parallel LLM training on a named JAX device mesh.

The Python API (the objects the `picotron-jax` command uses):

    import picotron_jax as pj
    cfg = pj.load_config("tp2-dp4", ["train.steps=50"])      # a preset name or a YAML path
    trainer = pj.Trainer(cfg)                                  # mesh, data, state, jitted step
    trainer.run(20)                                            # log line, progress bar, callbacks
    print(trainer.shardings())
    trainer.evaluate(); trainer.generate("def main(")
    trainer.reconfigure(optimizer={"lr": 1e-3}).run()

See README.md, "Python API", for the callback protocol, evaluation and generation.
"""

__version__ = "0.1.0"

# Exported lazily (PEP 562): `import picotron_jax` stays cheap and does not import JAX, so the command
# line can still set XLA flags and cluster settings before JAX starts.
_EXPORTS = {
    "Callback": "picotron_jax.callback", "LoopControl": "picotron_jax.callback",
    "register_callback": "picotron_jax.callbacks", "Config": "picotron_jax.config",
    "load_config": "picotron_jax.config", "RunAborted": "picotron_jax.errors", "UserError": "picotron_jax.errors",
    "Run": "picotron_jax.run", "build_run": "picotron_jax.run", "Summary": "picotron_jax.trainer",
    "Trainer": "picotron_jax.trainer",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'picotron_jax' has no attribute {name!r}")


def __dir__():
    return __all__
