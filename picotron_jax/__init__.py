"""picotron_jax: 4D-parallel LLM training on a named JAX device mesh."""

__version__ = "0.1.0"
