"""Bits per byte (``task=bpb``): a loss that does not depend on the tokenizer.

A loss in nats per token cannot compare a character model with a BPE model: their
tokens differ. Both, though, predict the same text, and the text has a fixed
number of UTF-8 bytes. Bits per byte is the exact summed loss over task=loss's
windows, in bits (divided by ln 2), over the number of bytes that the scored
tokens (the targets: every token of the windows but the very first) decode to.
For a character model on ASCII text it equals bits per character.

End-of-text separators between documents are scored like any token (as
task=loss scores them) but are not text, so they count no bytes.

``task.source=FILE`` scores a text file instead of the model's own split; it is
tokenized with the model's tokenizer in memory, each time. It is not cached in the
data root: tokenizing is fast next to running the model over the same tokens, and a
cache keyed on the file's contents would have to read and hash the file anyway.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt.errors import ConfigError, DataError
from nanogpt.evaluation.loss import summed_loss
from nanogpt.evaluation.tasks import Subject, Task, task_name
from nanogpt.options import option
from nanogpt.text.tokenizers import CharTokenizer, IdsTokenizer, TiktokenTokenizer, Tokenizer


@dataclass
class BpbOptions:
    """``task=bpb``: which text to score."""

    name: str = task_name("bpb")
    source: str | None = option(None, "a UTF-8 text file to score, tokenized with the model's tokenizer; "
                                      "null: the split task=loss scores")


class BpbTask(Task):
    """Bits per UTF-8 byte of the text the model's scored tokens decode to."""

    name = "bpb"
    Options = BpbOptions

    def check(self) -> None:
        if self.options.source is not None and not Path(self.options.source).expanduser().is_file():
            raise DataError(f"{self.key}.source={self.options.source} does not exist; give a UTF-8 text file")

    def run(self, subject: Subject) -> dict:
        if self.options.source is None:
            split = subject.split()
            tokens, where = split.tokens, {"tokens_file": str(split.where), "split": subject.split_name}
        else:
            tokens, where = self.source_tokens(subject.tokenizer), {"source": self.options.source}
        model = subject.model
        total, windows = summed_loss(model, tokens, subject.batch_size, subject.device, subject.dtype,
                                     subject.progress)
        scored = windows * model.config.block_size
        size = text_bytes(np.asarray(tokens[1: scored + 1]), subject.tokenizer)
        if size == 0:
            raise DataError(f"the {scored:,} tokens scored decode to no text; bits per byte needs text")
        return {**where, "bits_per_byte": total / math.log(2) / size, "bytes": size, "tokens": scored,
                "windows": windows, "loss": total / scored}

    def source_tokens(self, tokenizer: Tokenizer) -> np.ndarray:
        """task.source's ids, tokenized once per task (a training run scores the file again and again)."""
        if getattr(self, "tokenized", (None, None))[0] != tokenizer:
            self.tokenized = (tokenizer, file_tokens(self.options.source, tokenizer, self.key))
        return self.tokenized[1]

    def describe(self, result: dict) -> str:
        return (f"{result['bits_per_byte']:.4f} bits per byte over {result['bytes']:,} bytes "
                f"({result['tokens']:,} tokens, loss {result['loss']:.4f} per token)")

    def metrics(self, result: dict) -> dict[str, float]:
        return {"bpb": result["bits_per_byte"]}


def file_tokens(source: str, tokenizer: Tokenizer, key: str = "task") -> np.ndarray:
    """The ids of a text file under the model's tokenizer; one line naming the file if it cannot be read."""
    path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{key}.source={source} is not UTF-8 text (byte {e.start} cannot be decoded)") \
            from None
    try:
        return tokenizer.encode_array(text)
    except DataError as e:
        raise DataError(f"{key}.source={source}: {e}") from None


def text_bytes(ids: np.ndarray, tokenizer: Tokenizer) -> int:
    """How many UTF-8 bytes the ids decode to, end-of-text separators counting none."""
    if isinstance(tokenizer, IdsTokenizer):
        raise ConfigError("task=bpb needs text, but this model's tokens came from pre-tokenized files whose "
                          "tokenizer is unknown; score a model with a known tokenizer")
    if isinstance(tokenizer, (CharTokenizer, TiktokenTokenizer)):
        # Every id stands for a fixed string of bytes, so the total is a table lookup.
        return int(byte_lengths(tokenizer)[ids.astype(np.int64)].sum())
    if tokenizer.eot is not None:
        ids = ids[ids != tokenizer.eot]
    # Decoded in one piece: a character split across two tokens is counted once, whole.
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))


@functools.lru_cache(maxsize=4)
def byte_lengths(tokenizer: CharTokenizer | TiktokenTokenizer) -> np.ndarray:
    """UTF-8 bytes of each id of a character or tiktoken vocabulary (0 for special tokens)."""
    if isinstance(tokenizer, CharTokenizer):
        vocabulary = tokenizer.description["vocabulary"]
        return np.array([len(ch.encode("utf-8")) for ch in vocabulary], dtype=np.int64)
    encoding = tokenizer.encoding
    lengths = np.zeros(encoding.n_vocab, dtype=np.int64)
    for i in range(encoding.n_vocab):
        with contextlib.suppress(KeyError):  # some encodings leave ids unused
            lengths[i] = len(encoding.decode_single_token_bytes(i))
    for token in encoding.special_tokens_set:
        lengths[encoding.encode_single_token(token)] = 0
    return lengths
