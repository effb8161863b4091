"""Prompts for reinforcement learning (``dataset=prompts``), each with the fields its reward reads.

``dataset.source`` is a .jsonl file or a folder of them, one example a line:
``{"prompt": "...", ...}`` or ``{"messages": [... ending with the user's turn], ...}``;
every other field (a reference answer, test cases, ...) is kept for the reward
(nanogpt/training/rewards.py), which gets the whole line. A ``dataset=sft``
file ({"prompt", "response"}) is one too: the built-in exact_match reward
compares with "answer", else "response".

Prepared once into the cache, per split: ``<split>.bin`` (each prompt's ids
as the chat template writes them, ending with ``Assistant:``, the prompt the
model answers; the same ids ``nanogpt.chat`` would send), ``<split>.offsets.bin``
(int64, where each starts, and the end) and ``<split>.examples.jsonl`` (each
example's line and where it came from, for the reward and its messages). The
split is sft's: a fixed pseudo-random val_fraction of the examples validate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.sft import SPLIT_SEED, SftSource, check_characters, source_lines
from nanogpt.dataset.sources import local_files
from nanogpt.dataset.workers import write_tokens
from nanogpt.errors import DataError
from nanogpt.fileio import write_atomically
from nanogpt.text.chat_template import ChatTemplate, messages_problem
from nanogpt.text.tokenizers import Tokenizer

PROMPTS = "prompts"  # the meta.json key of prompt data: prompts per split


@dataclass
class PromptSource(SftSource):
    """Prompts from .jsonl files, encoded with the base model's tokenizer, with their examples' fields."""

    def files(self) -> list[Path]:
        return local_files(self.source, ".jsonl", 'dataset=prompts reads a .jsonl file of {"prompt", ...} or '
                                                  '{"messages", ...} lines, or a folder of them')

    def prepare(self, config: DatasetConfig, directory: Path, tokenizer: Tokenizer | None,
                processes: int) -> dict:
        template = ChatTemplate.for_tokenizer(tokenizer)
        examples = []
        for where, line in source_lines(self.files()):
            record, messages, problem = prompt_of(line)
            if problem is not None:
                raise DataError(f"{where}: {problem}")
            examples.append((messages, where, record))
        if tokenizer.kind == "char":
            check_characters([(m, where) for m, where, _ in examples], template,
                             tokenizer.description["vocabulary"])
        n_val = math.ceil(len(examples) * config.val_fraction)
        if len(examples) - n_val < 1:
            raise DataError(f"dataset.source {self.source} holds {len(examples)} prompt(s): too few to keep "
                            f"{n_val} for validation and train on the rest; add prompts or lower "
                            f"dataset.val_fraction={config.val_fraction}")
        held_out = set(np.random.default_rng(SPLIT_SEED).permutation(len(examples))[:n_val].tolist())
        splits = {"train": [e for i, e in enumerate(examples) if i not in held_out],
                  "val": [e for i, e in enumerate(examples) if i in held_out]}
        dtype = tokenizer.dtype
        made = {"tokenizer": tokenizer.description, "vocab_size": tokenizer.vocab_size, "dtype": dtype,
                "chat_template": template.record(), PROMPTS: {}}
        for split, chosen in splits.items():
            ids = [np.array(template.encode(m, tokenizer.encode, generation_prompt=True)[0], dtype=dtype)
                   for m, _, _ in chosen]
            made[f"{split}_tokens"] = write_tokens(directory / f"{split}.bin", ids)
            offsets = np.cumsum([0, *(len(i) for i in ids)]).astype(np.int64)
            write_tokens(directory / f"{split}.offsets.bin", [offsets])
            lines = "".join(json.dumps({"where": where, "example": record}) + "\n"
                            for _, where, record in chosen)
            write_atomically(directory / f"{split}.examples.jsonl", lambda tmp, t=lines: tmp.write_text(t))
            made[PROMPTS][split] = len(chosen)
        return made


def prompt_of(line: str) -> tuple[dict, list[dict], str | None]:
    """(the example's fields, the conversation to answer, None), or ({}, [], what is wrong with the line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return {}, [], f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return {}, [], 'each line must be a JSON object: {"prompt": ..., ...} or {"messages": [...], ...}'
    if "messages" in record:
        problem = messages_problem(record["messages"], for_training=False)
        return record, record["messages"], problem
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return record, [{"role": "user", "content": record["prompt"]}], None
    found = ", ".join(map(repr, record)) or "none"
    return {}, [], f'a line needs a "prompt" string, or "messages" (its keys: {found})'


def prompt_text(example: dict) -> str:
    """What a reward is given as the prompt: "prompt", or the conversation's last (user) message."""
    if "prompt" in example and "messages" not in example:
        return example["prompt"]
    return example["messages"][-1]["content"]
