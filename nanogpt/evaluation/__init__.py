"""Evaluation: scoring a model (``nanogpt.eval task=NAME``, and training's eval_tasks).

tasks.py (what a task is; the registry), registry.py (every task; running them for the eval
command and during training), one module per task: loss.py (the exact loss; training's estimate),
bpb.py (bits per byte), hellaswag.py, harness.py (any lm-evaluation-harness task, through
lm_adapter.py); scoring.py (log-likelihoods of continuations, lm-eval's rules), tokens.py (which
tokens loss and bpb score).
"""
