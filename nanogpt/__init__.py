"""nanoGPT: a readable GPT and a Hydra-configured experiment platform.

From Python::

    import nanogpt
    lm = nanogpt.load("outputs/2026-11-22/10-31-07")  # or "gpt2", an HF dir, nanoGPT's out_dir
    print(lm.generate("ROMEO:", max_new_tokens=200, temperature=0.8))

    model = nanogpt.GPT(nanogpt.GPTConfig(n_layer=4, n_head=4, n_embd=128))

Importing the package brings in torch but not Hydra: the command-line entry
points (nanogpt.train, .sample, .eval, ...) load it when they start.
"""

from nanogpt.loading import LanguageModel, load
from nanogpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "LanguageModel", "load"]
__version__ = "0.1.0"
