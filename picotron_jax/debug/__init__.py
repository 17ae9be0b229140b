"""The distributed debugger: conditional breakpoints (breakpoint.py, expr.py), replica consistency checks
(consistency.py), a flight recorder and hang reports (recorder.py, hang.py), post-mortem crash reports
(postmortem.py), and the `picotron-jax debug` command (command.py)."""
