"""Benchmarks a user runs (`bench`): a memory and FLOPs plan of a published shape without weights, and measured
training and generation tokens/s for a local model, or a published shape with random weights, on the device at hand,
with trl beside it and the machine recorded.
"""
