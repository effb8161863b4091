"""Tracking: what a run records. metrics.py (metrics.jsonl, summary.json), records.py (everything a training
run records), loggers.py (W&B, TensorBoard: logger=), progress.py (the bar), forecast.py (how long a run will
take), compare.py (tables and plots of runs and sweeps).
"""
