"""Sharded train-state checkpoints through Orbax (readable with Orbax alone, no picotron_jax needed).

manager.py saves (async, compressed, atomic, pruned), codecs.py and codec_select.py pick each array kind's
codec, quantize.py stores moments or parameters lossy when asked, restore.py restores with fallback,
storage.py picks local / gs:// / s3://, metadata.py describes a checkpoint, inspect.py lists them, hf.py
converts to and from Hugging Face Llama folders.
"""
