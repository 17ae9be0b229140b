"""Sharded train-state checkpoints through Orbax (readable with Orbax alone, no picotron_jax needed)."""

from picotron_jax.checkpoint.manager import Checkpointer

__all__ = ["Checkpointer"]
