"""Datasets: where text comes from, how it becomes tokens, the shared cache, and training batches.

config.py (the ``dataset`` options, the data root), sources.py (one Source class per
``dataset.loader``), tokenizers.py (one Tokenizer class per kind), pipeline.py
(prepare_dataset: lock, cache, meta.json), workers.py (the pool that scans and
encodes), batches.py (memory-mapped splits, BatchSampler), download.py,
gpt2_files.py (GPT-2's BPE files offline), nanogpt_files.py (nanoGPT's meta.pkl).
"""
