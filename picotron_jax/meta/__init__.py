"""Meta-learning on the mesh: algorithms.py (MAML, first-order MAML, Reptile, Meta-SGD), sine.py (tasks and
MLP), loop.py (the jitted meta-step, adaptation curves, `run_meta`), command.py (`picotron-jax meta`)."""
