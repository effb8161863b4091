"""Talk to a finetuned model: ``python -m nanogpt.chat [ckpt=RUN] [system="..."]``.

A read-eval-print loop: each line you type is the user's message; the answer
streams back as it is generated and ends at the end-of-text token. The
conversation is written with the chat template the checkpoint was finetuned
with (nanogpt/text/chat_template.py) and kept within the model's
block_size by dropping the oldest turns first. ``/clear`` starts over;
Ctrl-D or Ctrl-C leaves. With stdin piped, each line is a message and only the
answers are printed, one after another, so scripts and tests can talk to it.
The answers are what ``nanogpt.load(ckpt).chat(...)`` returns for the same settings.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from typing import TextIO

import torch
from omegaconf import DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.errors import UserError
from nanogpt.generation.inference import SamplingOptions, open_model
from nanogpt.options import option, require
from nanogpt.runtime.stops import Interrupted

CLEAR = "/clear"


@dataclass
class ChatConfig(SamplingOptions):
    """A conversation with a checkpoint."""

    system: str | None = option(None, "a system message put before the conversation")
    max_new_tokens: int = option(256, "the longest answer, in tokens")

    def __post_init__(self):
        super().__post_init__()
        require(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1")


def converse(cfg: ChatConfig, lines: TextIO = sys.stdin, out: TextIO = sys.stdout) -> list[dict]:
    """Answer each line of `lines` in turn, streaming to `out`; return the conversation."""
    lm = open_model(cfg, "chatting with")
    interactive = lines.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
        print(f"chatting with {lm.source.where} ({lm.model.config.block_size}-token context); "
              f"{CLEAR} starts over, Ctrl-D or Ctrl-C leaves", file=sys.stderr)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    generator = torch.Generator(device=lm.device).manual_seed(cfg.seed)
    while True:
        try:
            line = input("> ") if interactive and lines is sys.stdin else lines.readline()
            if not line and not interactive:
                break  # end of piped input
            text = line.strip()
            if not text:
                continue
            if text == CLEAR:
                messages = list(start)
                print("(a new conversation)", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": text})
            dropped: list[int] = []
            answer = ""
            try:
                pieces = lm.stream_chat(messages, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                        generator=generator, dropped=dropped)
                first = next(pieces, "")  # the prompt is fitted (and checked) before anything is shown
                if dropped[0]:
                    print(f"(the {dropped[0]} oldest messages no longer fit the context and are left out)",
                          file=sys.stderr)
                for piece in itertools.chain([first], pieces):
                    out.write(piece)
                    out.flush()
                    answer += piece
            except UserError as error:  # a character the vocabulary lacks: say so, and go on talking
                print(f"error: {error}", file=sys.stderr)
                messages.pop()
                continue
            out.write("\n")
            out.flush()
            messages.append({"role": "assistant", "content": answer})
        except (EOFError, KeyboardInterrupt, Interrupted):
            if interactive:
                print(file=sys.stderr)
            break
    return messages


@hydra_entry("chat", ChatConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: compose chat.yaml and talk until the input ends."""
    converse(to_dataclass(cfg, ChatConfig))


if __name__ == "__main__":
    main()
