"""nanoGPT: a readable GPT and a Hydra-configured experiment platform."""

__version__ = "0.1.0"
