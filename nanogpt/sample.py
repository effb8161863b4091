"""Generate text from a checkpoint: ``python -m nanogpt.sample [ckpt=...] [prompt=...]``.

Text streams to stdout as it is generated; notes about what is loaded go to
stderr, so ``> out.txt`` captures only the samples. ckpt= takes every source
nanogpt/weights/loading.py knows (our runs, karpathy/nanoGPT's out_dir, Hugging Face
directories and GPT-2 names), and the text is what ``nanogpt.load(ckpt)
.generate(prompt, ...)`` returns for the same settings: both go through
LanguageModel.stream.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.errors import ConfigError, DataError
from nanogpt.generation.inference import SamplingOptions, open_model, provenance
from nanogpt.options import option, require


@dataclass
class SampleConfig(SamplingOptions):
    """Generation from a checkpoint."""

    prompt: str = option("\n", "text the samples continue")
    prompt_file: str | None = option(None, "read the prompt from this file instead")
    num_samples: int = option(1, "how many samples to draw")
    num_tokens: int = option(500, "new tokens per sample")
    use_cache: bool = option(True, "KV cache: each new token costs one position, not the whole context")

    def __post_init__(self):
        super().__post_init__()
        require(self.num_tokens >= 0 and self.num_samples >= 1,
                "num_tokens must be >= 0 and num_samples >= 1")


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


def generate_samples(cfg: SampleConfig, out: TextIO | None = None) -> list[str]:
    """Write cfg.num_samples samples to out (sys.stdout as it is at the call) as they are generated."""
    out = out or sys.stdout
    lm = open_model(cfg, "sampling from")
    prompt = read_prompt(cfg)
    if not prompt:
        raise ConfigError("prompt is empty; give prompt=TEXT or prompt_file=PATH")

    # The samples are decoded together, as one batch; the first streams as it is written and
    # the others follow it. One seeded generator draws them all: the set is reproducible.
    sampling = cfg.sampling(cfg.num_tokens)
    steps = lm.stream_rows(prompt, cfg.num_samples, sampling, sampling.generator(lm.device), cfg.use_cache)
    texts = [""] * cfg.num_samples
    first = next(steps, texts)  # the prompt is checked before anything is written
    for line in provenance(lm):
        print(line, file=sys.stderr)
    out.write(prompt)
    for pieces in itertools.chain([first], steps):
        out.write(pieces[0])
        out.flush()
        texts = [text + piece for text, piece in zip(texts, pieces, strict=True)]
    out.write("\n")
    for text in texts[1:]:
        out.write(f"\n---------------\n{prompt}{text}\n")
    return [prompt + text for text in texts]


@hydra_entry("sample", SampleConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: compose sample.yaml and generate."""
    generate_samples(to_dataclass(cfg, SampleConfig))


if __name__ == "__main__":
    main()
