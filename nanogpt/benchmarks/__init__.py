"""Benchmarks: timing.py (the training step and generation, as nanogpt.bench times them),
suite.py (the GPU suite).
"""
