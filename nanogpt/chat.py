"""Talk to a finetuned model: ``python -m nanogpt.chat [ckpt=RUN] [system="..."]``.

A read-eval-print loop: each line you type is the user's message; the answer
streams back as it is generated and ends at the end-of-text token. The
conversation is written with the chat template the checkpoint was finetuned
with (nanogpt/text/chat_template.py) and kept within the model's
block_size by dropping the oldest turns first. Nothing is left out or cut
short without a word on stderr: old turns dropped, a message too long for the
context, an answer the context stopped, an answer the model ended before any
text, and (once) a model that was never finetuned on instruction data. ``/clear`` starts over;
Ctrl-D or Ctrl-C leaves. With stdin piped, each line is a message and only the
answers are printed, one after another, so scripts and tests can talk to it.
The answers are what ``nanogpt.load(ckpt).chat(...)`` returns for the same settings.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from typing import TextIO

from omegaconf import DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.errors import UserError
from nanogpt.generation.inference import SamplingOptions, open_model
from nanogpt.generation.language_model import ChatFit, not_finetuned_note
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


def converse(cfg: ChatConfig, lines: TextIO | None = None, out: TextIO | None = None) -> list[dict]:
    """Answer each line of `lines` in turn, streaming to `out`; return the conversation.

    Both default to sys.stdin and sys.stdout as they are at the call, not at import:
    a caller that redirected them (a notebook, a test) gets the text.
    """
    lines, out = lines or sys.stdin, out or sys.stdout
    lm = open_model(cfg, "chatting with")
    interactive = lines.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
        print(f"chatting with {lm.source.where} ({lm.model.config.block_size}-token context); "
              f"{CLEAR} starts over, Ctrl-D or Ctrl-C leaves", file=sys.stderr)
    if not lm.finetuned_for_chat:
        print(not_finetuned_note(lm), file=sys.stderr)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    sampling = cfg.sampling(cfg.max_new_tokens)
    generator = sampling.generator(lm.device)  # one for the whole conversation: it is reproducible
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
            fit = ChatFit()
            answer = ""
            try:
                pieces = lm.answer(messages, sampling, generator, fit)
                first = next(pieces, "")  # the prompt is fitted (and checked) before anything is shown
                for note in prompt_notes(fit):
                    print(note, file=sys.stderr)
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
            note = answer_note(fit, answer, cfg.temperature)
            if note:
                print(note, file=sys.stderr)
            messages.append({"role": "assistant", "content": answer})
        except (EOFError, KeyboardInterrupt, Interrupted):
            if interactive:
                print(file=sys.stderr)
            break
    return messages


def prompt_notes(fit: ChatFit) -> list[str]:
    """What was left out of the prompt to fit the model's context, in words (nothing is left out silently)."""
    notes = []
    if fit.dropped:
        notes.append(f"(the {fit.dropped} oldest messages no longer fit the context and are left out)")
    if fit.cut:
        notes.append(f"(your message is longer than the model's {fit.block_size}-token context: its first "
                     f"{fit.cut} tokens are left out)")
    return notes


def answer_note(fit: ChatFit, answer: str, temperature: float) -> str | None:
    """Why an answer is empty or short, when the model did not end it of its own accord with some text."""
    if fit.ended == "end" and not answer.strip():
        again = (": greedy decoding (temperature=0) will do so every time; try temperature=0.8, or finetune "
                 "longer") if temperature == 0 else ""
        return f"(the model ended its answer at once, before any text{again})"
    if fit.ended == "context":
        return (f"(the answer stopped at {fit.room} tokens: the prompt and the answer fill the model's "
                f"{fit.block_size}-token context; {CLEAR} starts a conversation with more room)")
    return None


@hydra_entry("chat", ChatConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: compose chat.yaml and talk until the input ends."""
    converse(to_dataclass(cfg, ChatConfig))


if __name__ == "__main__":
    main()
