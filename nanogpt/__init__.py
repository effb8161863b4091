"""nanoGPT: a readable GPT and a Hydra-configured experiment platform.

From Python::

    import nanogpt
    lm = nanogpt.load("outputs/2026-11-22/10-31-07")  # or "gpt2", an HF dir, nanoGPT's out_dir
    print(lm.generate("ROMEO:", max_new_tokens=200, temperature=0.8))

    model = nanogpt.GPT(nanogpt.GPTConfig(n_layer=4, n_head=4, n_embd=128))

The package at a glance: model.py is the lesson (a GPT read top to bottom); the
modules beside it are the commands (``python -m nanogpt.train | sample | chat | eval |
data | export | bench | report | serve | explain``); the folders below hold what nobody runs
directly, one per subsystem: cli (the Hydra edge), dataset, training, runtime,
weights, generation, evaluation, tracking, benchmarks.

The names are imported on first use (PEP 562), not with the package, so that
``import nanogpt`` stays light. Nothing here imports Hydra; the commands load it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanogpt.generation.language_model import LanguageModel, load
    from nanogpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "LanguageModel", "load"]
__version__ = "0.1.0"
_HOMES = {"GPT": "nanogpt.model", "GPTConfig": "nanogpt.model",
          "LanguageModel": "nanogpt.generation.language_model",
          "load": "nanogpt.generation.language_model"}


def __getattr__(name: str):
    """nanogpt.GPT, nanogpt.load, ...: imported from their modules when first asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module 'nanogpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
