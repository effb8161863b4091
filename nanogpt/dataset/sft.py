"""Instruction data (``dataset=sft``): prompt/response pairs or conversations, learned on the answers only.

``dataset.source`` is a .jsonl file or a folder of them (read in sorted order),
one example a line, either ``{"prompt": ..., "response": ...}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.
Each example is rendered with the chat template (nanogpt/text/chat_template.py),
ends with the end-of-text token, and is encoded with the base model's tokenizer:
the train command passes model.init_from's to prepare_dataset, and
``dataset.tokenizer`` must name the same (``gpt2`` for GPT-2, ``char`` for a
character-level base, whose characters then come from the base).

Prepared once into the cache like every dataset, per split:
``<split>.bin`` (the ids of every example, one after another),
``<split>.mask.bin`` (uint8, 1 where the token is part of an answer: a target
the loss covers) and ``<split>.offsets.bin`` (int64, where each example starts,
and the end). The split is by example: a fixed pseudo-random val_fraction of
them validate.

Batches (ExampleWindows in batches.py, used by BatchSampler) hold one example per row,
padded at the end, rather than packing several examples into a window: padding
needs no attention mask for examples not to see each other, and each example
starts at position 0, as a conversation does in chat. A batch is only as wide as
its longest example (rounded up to a multiple of 64, so a compiled model sees few
shapes). An example longer than block_size + 1 tokens is cut from the left, so
the answer stays whole and the prompt loses its beginning; how many are cut is
logged when training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.sources import Source, local_files, stamp
from nanogpt.dataset.workers import write_tokens
from nanogpt.errors import ConfigError, DataError
from nanogpt.text.chat_template import ChatTemplate, messages_problem
from nanogpt.text.tokenizers import Tokenizer

log = logging.getLogger("nanogpt.data")

SPLIT_SEED = 0  # the same file always splits the same way
MAX_LISTED = 10  # characters listed when a character vocabulary cannot encode the data


@dataclass
class SftSource(Source):
    """Instruction examples from .jsonl files, encoded with the base model's tokenizer."""

    source: str
    tokenizer: Tokenizer | None = None  # set by encoding_tokenizer: what the examples are encoded with

    @classmethod
    def from_config(cls, config: DatasetConfig) -> Source:
        return cls(config.source)

    def files(self) -> list[Path]:
        """The .jsonl files, in the order their examples are read."""
        return local_files(self.source, ".jsonl", 'dataset=sft reads a .jsonl file of {"prompt", "response"} '
                                                  'or {"messages"} lines, or a folder of them')

    def encoding_tokenizer(self, config: DatasetConfig, named: Tokenizer | None,
                           model: Tokenizer | None) -> Tokenizer:
        """The base model's tokenizer (model), which dataset.tokenizer must name; else the named one."""
        if config.tokenizer == "bpe":
            raise ConfigError("dataset=sft is encoded with the base model's tokenizer; dataset.tokenizer=bpe "
                              "would train a new one: set dataset.tokenizer to the base's (gpt2, char, ...)")
        if model is None and named is None:
            raise ConfigError(
                "dataset=sft with dataset.tokenizer=char takes its characters from the base model: prepare "
                "it by training (python -m nanogpt.train dataset=sft model.init_from=BASE ...)")
        if model is not None:
            if model.kind == "ids":
                raise ConfigError("the base model's tokenizer is unknown (pre-tokenized data), so text "
                                  "cannot be encoded for it; start from a model that carries its tokenizer")
            same = model.kind == "char" if named is None else named.encodes_like(model)
            if not same:
                raise ConfigError(
                    f"dataset.tokenizer={config.tokenizer} does not match the base model, which was trained "
                    f"with {model.name}; set dataset.tokenizer={tokenizer_option(model)}")
        self.tokenizer = model if model is not None else named
        return self.tokenizer

    def fingerprint(self) -> dict:
        """The files by their stat, and the tokenizer (another base's characters rebuild)."""
        tokenizer = hashlib.sha256(self.tokenizer.key.encode()).hexdigest()
        return {"files": stamp(self.files()), "template": ChatTemplate().record(),
                "tokenizer_sha256": tokenizer}

    def prepare(self, config: DatasetConfig, directory: Path, tokenizer: Tokenizer | None,
                processes: int) -> dict:
        """Read, check, encode and split the examples; write the ids, masks and offsets of each split."""
        template = ChatTemplate.for_tokenizer(tokenizer)
        examples = read_examples(self.files(), template, self.conversations, self.empty_answers)
        if tokenizer.kind == "char":
            check_characters([(m, where) for conversations, where in examples for m in conversations],
                             template, tokenizer.description["vocabulary"])
        n_val = math.ceil(len(examples) * config.val_fraction)
        if len(examples) - n_val < 1:
            raise DataError(f"dataset.source {self.source} holds {len(examples)} example(s): too few to keep "
                            f"{n_val} for validation and train on the rest; add examples or lower "
                            f"dataset.val_fraction={config.val_fraction}")
        held_out = set(np.random.default_rng(SPLIT_SEED).permutation(len(examples))[:n_val].tolist())
        splits = {"train": [e for i, e in enumerate(examples) if i not in held_out],
                  "val": [e for i, e in enumerate(examples) if i in held_out]}
        dtype = tokenizer.dtype
        made = {"tokenizer": tokenizer.description, "vocab_size": tokenizer.vocab_size, "dtype": dtype,
                "chat_template": template.record(), "examples": {}, "answer_tokens": {}}
        try:
            for split, chosen in splits.items():
                ids, learned, offsets = [], [], [0]
                for conversations, _ in tqdm(chosen, desc=f"encode {split}", unit="example", disable=None):
                    for messages in conversations:  # one; a preference pair's two, chosen first
                        example_ids, example_learned = template.encode(messages, tokenizer.encode)
                        example_learned = self.learned(example_learned)
                        ids.append(np.array(example_ids, dtype=dtype))
                        learned.append(np.array(example_learned, dtype=np.uint8))
                        offsets.append(offsets[-1] + len(example_ids))
                made[f"{split}_tokens"] = write_tokens(directory / f"{split}.bin", ids)
                write_tokens(directory / f"{split}.mask.bin", learned)
                write_tokens(directory / f"{split}.offsets.bin", [np.array(offsets, dtype=np.int64)])
                made["examples"][split] = len(offsets) - 1
                made["answer_tokens"][split] = int(sum(int(m.sum()) for m in learned))
        except BaseException:
            for split in splits:  # train.bin and val.bin are the pipeline's to remove
                for name in (f"{split}.mask.bin", f"{split}.offsets.bin"):
                    (directory / name).unlink(missing_ok=True)
            raise
        made.update(self.described(splits))
        log.info("%s: %d train / %d val %s, %s tokens of answers to learn in train", config.loader,
                 len(splits["train"]), len(splits["val"]), self.unit, f"{made['answer_tokens']['train']:,}")
        return made

    unit = "examples"  # what one line of the source is, for the log
    empty_answers = False  # an instruction example must have an answer to learn

    @staticmethod
    def conversations(line: str) -> tuple[list[list[dict]], str | None]:
        """The conversations one line holds (one, to learn its answers), or what is wrong with it."""
        messages, problem = example_messages(line)
        return [messages], problem

    @staticmethod
    def learned(learned: list[bool]) -> list[bool]:
        """Which ids of an encoded conversation the loss covers: every answer of it."""
        return learned

    def described(self, splits: dict[str, list]) -> dict:
        """What meta.json says besides the tokens: nothing more for instruction data."""
        return {}


def tokenizer_option(tokenizer: Tokenizer) -> str:
    """The dataset.tokenizer value that names a tokenizer, for messages."""
    if tokenizer.kind == "tiktoken":
        return tokenizer.description["encoding"]
    if tokenizer.kind == "hf":
        return tokenizer.description.get("origin", "PATH/tokenizer.json")
    return "char"


def read_examples(files: list[Path], template: ChatTemplate,
                  conversations: Callable = SftSource.conversations,
                  empty_answers: bool = False) -> list[tuple[list[list[dict]], str]]:
    """Every example as (its conversations, where), checked; the first bad line stops, named by file and line.

    conversations(line) reads one line: (the conversations it holds, None) or ([], what is wrong).
    empty_answers: an empty answer is allowed (still learned: its end is), as a pair's may be.
    """
    examples = []
    for where, line in source_lines(files):
        found, problem = conversations(line)
        if problem is None:
            answers = [m["content"] for messages in found for m in messages if m["role"] == "assistant"
                       and (m["content"].strip() or not empty_answers)]
            problem = next(filter(None, map(template.answer_problem, answers)), None)
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        examples.append((found, where))
    return examples


def source_lines(files: list[Path]) -> list[tuple[str, str]]:
    """(file:line, text) of every non-blank line of the .jsonl files; none at all is refused."""
    found = []
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
        found += [(f"{file}:{number}", line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not found:
        where = files[0] if len(files) == 1 else files[0].parent
        raise DataError(f"dataset.source {where} holds no examples")
    return found


def example_messages(line: str) -> tuple[list[dict], str | None]:
    """(messages, None) for one JSON line, or ([], what is wrong with it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return [], f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return [], 'each line must be a JSON object: {"prompt": ..., "response": ...} or {"messages": [...]}'
    if "messages" in record:
        return record["messages"], messages_problem(record["messages"], for_training=True)
    if "prompt" in record and "response" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["response"], str):
            return [], '"prompt" and "response" must be strings'
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}], None
    found = ", ".join(map(repr, record)) or "none"
    return [], f'a line needs "prompt" and "response", or "messages" (its keys: {found})'


def check_characters(examples: list[tuple[list[dict], str]], template: ChatTemplate,
                     vocabulary: list[str]) -> None:
    """Refuse, listing them, characters of the rendered examples that the base's vocabulary cannot encode."""
    known = set(vocabulary)
    first: dict[str, str] = {}
    for messages, where in examples:
        characters, _ = template.encode(messages, list)  # the text as it will be encoded, one character an id
        for ch in set(characters) - known:
            first.setdefault(ch, where)
    if first:
        listed = ", ".join(f"{ch!r} (U+{ord(ch):04X}, {where})"
                           for ch, where in sorted(first.items())[:MAX_LISTED])
        more = f" and {len(first) - MAX_LISTED} more" if len(first) > MAX_LISTED else ""
        raise DataError(f"the base model's {len(vocabulary)}-character vocabulary cannot encode "
                        f"{len(first)} character(s) of dataset.source: {listed}{more}; remove or replace "
                        "them")
