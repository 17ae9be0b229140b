"""The profiler: captures steady steps with jax.profiler, joins the trace to the compiled program and names
the bottleneck with a suggested setting (README "Profiling"). A feature on top of the loop: nothing below imports it."""
