"""Looking inside a trained model: numbers.py (what it computed reading a text: attention, log-probabilities,
the logit lens; LanguageModel.explain), reading.py (what each head mostly does, the embeddings' map),
page.py with page.html (one self-contained HTML page) and pictures.py (the same pictures as PNGs).
python -m nanogpt.explain writes them; docs/reading-the-pictures.md says how to read them.
"""
