"""Observability helpers: inspect compiled programs, timings and traffic."""
