"""Graders for the tutorial notebooks in `notebooks/` (and `python -m picotron_jax.tutorials.reset`).

Each lesson's exercise is a value or a small function the learner writes; its grader checks it against
properties measured on the mesh (per-device shapes of the real layout, values and gradients against a
reference, collective bytes in the compiled HLO, the schedule tables' bubble, the MoE layer's drops),
never against a stored string. A failed check raises `ExerciseFailed` naming the property and the
difference; a passed one returns a `Passed` that prints the properties that held.
"""

from picotron_jax.tutorials.grading import ExerciseFailed, Passed

__all__ = ["ExerciseFailed", "Passed"]
