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
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nanogpt.checkpoint import newest_checkpoint
from nanogpt.cli import hydra_entry, to_dataclass
from nanogpt.config import SampleConfig
from nanogpt.device import resolve_device, resolve_dtype
from nanogpt.errors import ConfigError, DataError
from nanogpt.loading import LanguageModel, resolve_source
from nanogpt.options import option


@dataclass
class SampleSettings(SampleConfig):
    """SampleConfig plus where a karpathy/nanoGPT checkpoint's vocabulary is (until config.py has it)."""

    meta: str | None = option(None, help="karpathy/nanoGPT checkpoints: their meta.pkl, when it is not "
                              "data/<dataset>/meta.pkl under the current directory")


ConfigStore.instance().store(name="sample_settings_schema", node=SampleSettings)


def validate_sample_config(cfg: SampleConfig) -> None:
    """Raise ConfigError naming the first sampling setting that cannot work."""
    if cfg.temperature < 0:
        raise ConfigError(f"temperature={cfg.temperature} must be >= 0 (0 picks the likeliest token)")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise ConfigError(f"top_k={cfg.top_k} must be at least 1, or null for no top-k filter")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p={cfg.top_p} must be in (0, 1], or null for no nucleus filter")
    if cfg.num_tokens < 0 or cfg.num_samples < 1:
        raise ConfigError("num_tokens must be >= 0 and num_samples >= 1")


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


def generate_samples(cfg: SampleSettings, out: TextIO = sys.stdout) -> list[str]:
    """Write cfg.num_samples samples to out as they are generated; return them."""
    validate_sample_config(cfg)
    source = cfg.ckpt or newest_checkpoint(cfg.outputs)
    if not cfg.ckpt:
        print(f"sampling from the newest run's checkpoint: {source}", file=sys.stderr)
    device = resolve_device(cfg.device.name)
    dtype = resolve_dtype(cfg.device.dtype, device)
    lm = LanguageModel(resolve_source(source, key="ckpt", meta=cfg.meta), device, dtype)
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
    generate_samples(to_dataclass(cfg, SampleSettings))


if __name__ == "__main__":
    main()
