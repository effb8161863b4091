"""Preference pairs (``dataset=preference``): a prompt, a better answer and a worse one, for objective=dpo.

``dataset.source`` is a .jsonl file or a folder of them, one pair a line, either

    {"prompt": "reverse: abc", "chosen": "cba", "rejected": "cab"}

or a conversation before the two final answers:

    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ..., {"role": "user", ...}],
     "chosen": {"role": "assistant", "content": ...}, "rejected": {"role": "assistant", "content": ...}}

Each pair is prepared exactly as ``dataset=sft`` prepares an example (sft.py:
the chat template, the base model's tokenizer, the prompt masked), twice: the
conversation followed by the chosen answer, then by the rejected one. So the
cache holds sft's files, with example 2i the chosen answer of pair i and
2i + 1 its rejected one; the split keeps each pair together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nanogpt.dataset.sft import SftSource
from nanogpt.dataset.sources import local_files
from nanogpt.text.chat_template import messages_problem

PAIRED = "pairs"  # the meta.json key of preference data: pairs per split


@dataclass
class PreferenceSource(SftSource):
    """Preference pairs from .jsonl files, encoded with the base model's tokenizer."""

    unit = "pairs"
    empty_answers = True  # a model's answer may be nothing at all, and be the worse one (or the better)

    def files(self) -> list[Path]:
        return local_files(self.source, ".jsonl", 'dataset=preference reads a .jsonl file of {"prompt", '
                                                  '"chosen", "rejected"} or {"messages", "chosen", '
                                                  '"rejected"} lines, or a folder of them')

    @staticmethod
    def conversations(line: str) -> tuple[list[list[dict]], str | None]:
        """The pair's two conversations, chosen answer first, or what is wrong with the line."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return [], f"not valid JSON ({e.msg} at column {e.colno})"
        if not isinstance(record, dict) or not {"chosen", "rejected"} <= record.keys() \
                or not ({"prompt", "messages"} & record.keys()):
            found = ", ".join(map(repr, record)) if isinstance(record, dict) else "not an object"
            return [], ('a pair needs "prompt" (or "messages"), "chosen" and "rejected" '
                        f"(its keys: {found or 'none'})")
        if "messages" in record:
            before, problem = record["messages"], messages_problem(record["messages"], for_training=False)
            if problem is not None:
                return [], f"{problem} (the messages are the conversation before the two answers)"
        elif isinstance(record["prompt"], str):
            before = [{"role": "user", "content": record["prompt"]}]
        else:
            return [], '"prompt" must be a string'
        answers = []
        for key in ("chosen", "rejected"):
            answer, problem = answer_text(record[key], key)
            if problem is not None:
                return [], problem
            answers.append(answer)
        if answers[0] == answers[1]:
            return [], ('"chosen" and "rejected" are the same answer; a pair needs a better answer and a '
                        "worse one")
        return [[*before, {"role": "assistant", "content": answer}] for answer in answers], None

    @staticmethod
    def learned(learned: list[bool]) -> list[bool]:
        """Only the final answer (the ids after the last masked one): earlier turns are the prompt."""
        last_masked = max((i for i, flag in enumerate(learned) if not flag), default=-1)
        return [i > last_masked for i in range(len(learned))]

    def described(self, splits: dict[str, list]) -> dict:
        return {PAIRED: {split: len(pairs) for split, pairs in splits.items()}}


def answer_text(value: object, key: str) -> tuple[str, str | None]:
    """(the answer's text, None) for a string or an assistant message, else ("", what is wrong)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and value.get("role", "assistant") == "assistant" \
            and isinstance(value.get("content"), str):
        return value["content"], None
    return "", (f'"{key}" must be a string or {{"role": "assistant", "content": "text"}}, '
                f"not {str(value)[:60]}")
