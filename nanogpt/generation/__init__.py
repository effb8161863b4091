"""Generation: from a trained model to text. language_model.py (nanogpt.load and LanguageModel: text
in, text out, chat), inference.py (the options and open_model() that sample, chat and eval share).
The KV cache and the token-by-token loop are the model's own (nanogpt/model.py).
"""
