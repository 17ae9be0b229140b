"""Parallelism: logical-axis rules (data, ZeRO, tensor) and the parts that need code beyond rules."""
