"""Weights: checkpoint files (checkpoint.py; an FSDP job's shards, sharded.py), loading a model from any
source (loading.py), Hugging Face GPT-2 in and out (huggingface.py), int8 weights for fast CPU generation
(quantize.py).
"""
