"""Generate text from a checkpoint: ``python -m nanogpt.sample [ckpt=...] [prompt=...]``.

Text streams to stdout as it is generated; notes about what is loaded go to
stderr, so ``> out.txt`` captures only the samples. ckpt= takes every source
nanogpt.loading knows (our runs, karpathy/nanoGPT's out_dir, Hugging Face
directories and GPT-2 names), and the text is what ``nanogpt.load(ckpt)
.generate(prompt, ...)`` returns for the same settings: both go through
LanguageModel.stream.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from omegaconf import DictConfig

from nanogpt.checkpoint import newest_checkpoint
from nanogpt.cli import hydra_entry, to_dataclass
from nanogpt.config import SampleConfig
from nanogpt.device import resolve_device, resolve_dtype, set_threads
from nanogpt.errors import ConfigError, DataError
from nanogpt.loading import LanguageModel, resolve_source


def read_prompt(cfg: SampleConfig) -> str:
    """The prompt text: from prompt_file when given, else the prompt key."""
    if cfg.prompt_file is None:
        return cfg.prompt
    path = Path(cfg.prompt_file).expanduser()
    if not path.is_file():
        raise DataError(f"prompt_file={path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompt_file={path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None


def generate_samples(cfg: SampleConfig, out: TextIO = sys.stdout) -> list[str]:
    """Write cfg.num_samples samples to out as they are generated; return them."""
    source = cfg.ckpt or newest_checkpoint(cfg.outputs)
    if not cfg.ckpt:
        print(f"sampling from the newest run's checkpoint: {source}", file=sys.stderr)
    device = resolve_device(cfg.device.name)
    set_threads(cfg.device.threads)
    dtype = resolve_dtype(cfg.device.dtype, device)
    lm = LanguageModel(resolve_source(source, key="ckpt", meta=cfg.meta), device, dtype, cfg.quantize)
    prompt = read_prompt(cfg)
    if not prompt:
        raise ConfigError("prompt is empty; give prompt=TEXT or prompt_file=PATH")

    # One generator for all samples, so each sample differs and the set is reproducible.
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = []
    for n in range(cfg.num_samples):
        if n:
            out.write("\n---------------\n")
        pieces = lm.stream(prompt, cfg.num_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                           use_cache=cfg.use_cache, generator=generator)
        text = next(pieces, "")  # the prompt is checked before anything is written
        out.write(prompt + text)
        for piece in pieces:
            out.write(piece)
            out.flush()
            text += piece
        out.write("\n")
        samples.append(prompt + text)
    return samples


@hydra_entry("sample")
def main(cfg: DictConfig) -> None:
    """Entry point: compose sample.yaml and generate."""
    generate_samples(to_dataclass(cfg, SampleConfig))


if __name__ == "__main__":
    main()
