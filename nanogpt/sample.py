"""Generate text from a checkpoint: ``python -m nanogpt.sample [ckpt=...] [prompt=...]``.

Text streams to stdout as it is generated; notes about what is loaded go to
stderr, so ``> out.txt`` captures only the samples.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from omegaconf import DictConfig

from nanogpt.checkpoint import build_model, find_checkpoint, load_checkpoint, newest_checkpoint
from nanogpt.cli import hydra_entry, to_dataclass
from nanogpt.config import SampleConfig
from nanogpt.data import UnknownTokenError, tokenizer_codec
from nanogpt.device import autocast, resolve_device, resolve_dtype, set_threads
from nanogpt.errors import ConfigError, DataError


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


def generate_samples(cfg: SampleConfig, out: TextIO = sys.stdout) -> list[str]:
    """Write cfg.num_samples samples to out as they are generated; return them."""
    validate_sample_config(cfg)
    ckpt_path = find_checkpoint(cfg.ckpt) if cfg.ckpt else newest_checkpoint(cfg.outputs)
    if not cfg.ckpt:
        print(f"sampling from the newest run's checkpoint: {ckpt_path}", file=sys.stderr)
    device = resolve_device(cfg.device.name)
    set_threads(cfg.device.threads)
    dtype = resolve_dtype(cfg.device.dtype, device)
    state = load_checkpoint(ckpt_path, map_location=device)
    model = build_model(state).to(device).eval()
    encode, decode = tokenizer_codec(state["tokenizer"])

    prompt = read_prompt(cfg)
    if not prompt:
        raise ConfigError("prompt is empty; give prompt=TEXT or prompt_file=PATH")
    try:
        prompt_ids = encode(prompt)
    except UnknownTokenError as e:
        raise DataError(f"prompt: {e} of checkpoint {ckpt_path}") from None

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = []
    for n in range(cfg.num_samples):
        if n:
            out.write("\n---------------\n")
        out.write(prompt)
        ids: list[int] = []
        shown = ""
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        with autocast(device, dtype):
            steps = model.stream(
                idx, cfg.num_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                use_cache=cfg.use_cache, generator=generator,
            )
            for token in steps:
                ids.append(int(token))
                # Decode everything so far and print what is new, so multi-token
                # characters appear only once they are complete.
                text = decode(ids)
                out.write(text[len(shown):])
                out.flush()
                shown = text
        out.write("\n")
        samples.append(prompt + shown)
    return samples


@hydra_entry("sample")
def main(cfg: DictConfig) -> None:
    """Entry point: compose sample.yaml and generate."""
    generate_samples(to_dataclass(cfg, SampleConfig))


if __name__ == "__main__":
    main()
