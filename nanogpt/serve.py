"""Serve a checkpoint: ``python -m nanogpt.serve [ckpt=...] [host=...] [port=...] [api_key=...]``.

An OpenAI-compatible server (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, streamed or not), a chat page at ``/`` and ``/health``.
Concurrent requests share one batched decoding loop (nanogpt/generation/
batching.py); the server itself is nanogpt/serving/. ckpt= takes every source
``nanogpt.sample`` takes, and a request gets exactly what ``nanogpt.sample`` and
``LanguageModel.chat`` give for the same settings and seed. Listens on
127.0.0.1 unless told otherwise; writes no files. docs/serving.md is the manual.
"""

from __future__ import annotations

from omegaconf import DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.serving.config import ServeConfig


@hydra_entry("serve", ServeConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: compose serve.yaml and serve until stopped."""
    config = to_dataclass(cfg, ServeConfig)  # checks the optional packages first
    from nanogpt.serving.server import serve  # imports fastapi and uvicorn

    serve(config)


if __name__ == "__main__":
    main()
