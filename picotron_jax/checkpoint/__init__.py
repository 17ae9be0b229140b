"""Sharded train-state checkpoints through Orbax (readable with Orbax alone, no picotron_jax needed).

manager.py saves (async, zstd, atomic, pruned), restore.py restores with fallback, storage.py picks
local / gs:// / s3://, metadata.py and integrity.py describe and verify a checkpoint, inspect.py
lists them, hf.py converts to and from Hugging Face Llama folders.
"""
