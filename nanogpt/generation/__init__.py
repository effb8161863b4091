"""Generation: from a model to text. decoding.py (the KV cache and the token-by-token loop), sampling.py
(choosing the next token), language_model.py (nanogpt.load and LanguageModel: text in, text out).
"""
