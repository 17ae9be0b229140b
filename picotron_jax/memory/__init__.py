"""Compile-only memory estimates of the train step and a planner that fits a budget."""
