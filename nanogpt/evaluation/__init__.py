"""Evaluation: scoring a model. tokens.py (which tokens), loss.py (the exact loss over a split)."""
