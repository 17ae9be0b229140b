"""Measurement: FLOPs and MFU, memory, metrics files, compiled-HLO analysis."""
