"""HellaSwag (``task=hellaswag``), scored exactly as lm-evaluation-harness's ``hellaswag`` task scores it.

Each example is a context and four endings, one of them right. As lm-eval
(lm_eval/tasks/hellaswag: hellaswag.yaml and utils.py) does it:

* the context is ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``
  (Python's capitalize: the first letter upper case, every other lower case), and
  it and each ending are cleaned by preprocess() below;
* each ending is scored as the continuation ``" " + ending`` of the context (the
  task's target delimiter is one space): the summed log-likelihood of its tokens
  (nanogpt/evaluation/scoring.py, lm-eval's tokenization and left truncation);
* acc counts examples whose likeliest ending is the labelled one; acc_norm
  divides each ending's log-likelihood by the ending's length in characters (the
  cleaned ending, without the delimiter) first, as lm-eval's multiple-choice
  scoring does. Ties go to the first ending, as numpy's argmax breaks them.

The data is the 10,042-example validation set from the dataset's own repository,
downloaded once into the data root (the same file Hugging Face's Rowan/hellaswag,
which lm-eval reads, was built from), or any JSONL file in its schema
(``task.source=FILE``). A download enters the cache only once its sha256 is the
one published for it (Hugging Face ``datasets``' card for ``hellaswag``:
hellaswag_val.jsonl, 12,246,618 bytes); one that fails leaves nothing behind,
not even the folder it was to go in.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from requests import RequestException

from nanogpt.dataset.download import describe_request_error, download
from nanogpt.errors import DataError
from nanogpt.evaluation.scoring import encode_pair, score_requests
from nanogpt.evaluation.tasks import Subject, Task, task_name
from nanogpt.fileio import removed_unless_filled, sha256_of_file
from nanogpt.options import option, require
from nanogpt.text.tokenizers import Tokenizer, UnknownTokenError

VALIDATION_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VALIDATION_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"  # as published
VALIDATION_BYTES = 12_246_618
CACHE_FILE = Path("hellaswag") / "hellaswag_val.jsonl"  # under the data root
TARGET_DELIMITER = " "


@dataclass
class HellaSwagOptions:
    """``task=hellaswag``: which examples to score."""

    name: str = task_name("hellaswag")
    source: str | None = option(None, "a local JSONL file in HellaSwag's schema (activity_label, ctx_a, "
                                      "ctx_b, endings, label); null: the 10,042-example validation set, "
                                      "downloaded once into data_root")
    limit: int | None = option(None, "score only the first N examples; null: all")

    def __post_init__(self) -> None:
        require(self.limit is None or self.limit >= 1, f"limit={self.limit} must be at least 1 (or null)")


@dataclass
class Example:
    """One HellaSwag question, cleaned as lm-eval cleans it."""

    context: str
    endings: list[str]
    label: int


class HellaSwagTask(Task):
    """acc and acc_norm on HellaSwag, as lm-evaluation-harness computes them."""

    name = "hellaswag"
    Options = HellaSwagOptions

    def check(self) -> None:
        if self.options.source is not None:
            missing_source(self.options.source, self.key)

    def run(self, subject: Subject) -> dict:
        source = self.options.source
        path = Path(source).expanduser() if source else validation_file(subject.data_root, self.key)
        # Read and encoded once per task and model shape: a training run scores them again and again.
        key = (path, subject.tokenizer, subject.model.config.block_size)
        if getattr(self, "encoded", (None,))[0] != key:
            examples = read_examples(path, self.options.limit)
            self.encoded = key, examples, encode_examples(examples, subject.tokenizer, key[2], path)
        _, examples, requests = self.encoded
        acc, acc_norm = accuracies(examples, ending_likelihoods(subject, examples, path, requests))
        return {"source": str(path), "acc": acc, "acc_norm": acc_norm, "examples": len(examples)}

    def describe(self, result: dict) -> str:
        return (f"HellaSwag acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} over "
                f"{result['examples']:,} examples of {result['source']}")

    def metrics(self, result: dict) -> dict[str, float]:
        return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}


def preprocess(text: str) -> str:
    """Clean a HellaSwag text as lm-eval's hellaswag task does.

    WikiHow examples carry bracketed markers such as "[header]": a " [title]" is
    replaced by ". ", every other bracketed span is dropped, and double spaces
    are made single, after stripping the ends.
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def example_from(doc: dict) -> Example:
    """An Example from one parsed JSON line (KeyError, TypeError or ValueError if it is not one)."""
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    endings = doc["endings"]
    if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings):
        raise TypeError("endings must be a list of strings")
    label = int(doc["label"])  # an int in the original files, a string in Hugging Face's copy
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} is not the index of one of the {len(endings)} endings")
    return Example(preprocess(doc["activity_label"] + ": " + context), [preprocess(e) for e in endings],
                   label)


def missing_source(source: str, key: str = "task") -> None:
    """Refuse a task.source that is not a file, saying what it should be."""
    if not Path(source).expanduser().is_file():
        raise DataError(f"{key}.source={source} does not exist; give a JSONL file in HellaSwag's schema "
                        "(one object a line with activity_label, ctx_a, ctx_b, endings, label)")


def read_examples(path: Path, limit: int | None = None) -> list[Example]:
    """The examples of a HellaSwag JSONL file (the first limit); a malformed line is one error naming it."""
    missing_source(str(path))
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                examples.append(example_from(json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
                    AttributeError) as e:
                reason = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
                raise DataError(f"{path}:{number} is not a HellaSwag example ({reason}); each line must "
                                "be a JSON object with activity_label, ctx_a, ctx_b, endings and label") \
                    from None
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def validation_file(data_root: Path, key: str = "task") -> Path:
    """The validation set in the data root, downloaded and checked the first time it is needed."""
    path = Path(data_root).expanduser() / CACHE_FILE
    if path.is_file():
        return path
    staged = path.with_name(f".{path.name}.{os.getpid()}.download")
    with removed_unless_filled(path.parent):  # a failed download leaves no empty hellaswag/ behind
        try:
            try:
                download(VALIDATION_URL, staged)
            except DataError as e:
                cause = e.__context__  # what requests raised, kept although download() reports it its own way
                reason = describe_request_error(cause) if isinstance(cause, RequestException) else str(e)
                raise DataError(f"could not download HellaSwag's validation set from {VALIDATION_URL} "
                                f"({reason}); offline, fetch that file elsewhere and give "
                                f"{key}.source=PATH") from None
            digest = sha256_of_file(staged)
            if digest != VALIDATION_SHA256:
                raise DataError(f"{VALIDATION_URL} sent {staged.stat().st_size:,} bytes with sha256 "
                                f"{digest}, not the published validation set ({VALIDATION_BYTES:,} bytes, "
                                f"sha256 {VALIDATION_SHA256}); nothing was cached (give {key}.source=PATH "
                                "for a file of your own)")
            os.replace(staged, path)  # only a complete, checked file enters the cache
        finally:
            staged.unlink(missing_ok=True)
    return path


def ending_likelihoods(subject: Subject, examples: list[Example], where: Path,
                       requests: list | None = None) -> np.ndarray:
    """(examples, endings) summed log-likelihoods of each ending after its context.

    requests: the examples as encode_examples() encodes them for this model, if already done.
    """
    if requests is None:
        requests = encode_examples(examples, subject.tokenizer, subject.model.config.block_size, where)
    scores = score_requests(subject.model, requests, subject.batch_size, subject.device, subject.dtype,
                            subject.progress, desc="hellaswag")
    return np.array([logprob for logprob, _ in scores]).reshape(len(examples), -1)


def encode_examples(examples: list[Example], tokenizer: Tokenizer, block: int, where: Path) -> list:
    """(context ids, continuation ids) of every ending of every example, in order."""
    counts = [len(example.endings) for example in examples]
    if len(set(counts)) != 1:
        raise DataError(f"{where}: examples have {min(counts)} to {max(counts)} endings; all need the same "
                        "number")
    requests = []
    for number, example in enumerate(examples, start=1):
        try:
            pairs = [encode_pair(tokenizer.encode, example.context, TARGET_DELIMITER + ending, tokenizer.eot)
                     for ending in example.endings]
        except UnknownTokenError as e:
            raise DataError(f"{where}: {e}; HellaSwag needs a model whose tokenizer covers its text "
                            "(GPT-2 BPE, or any byte-level BPE)") from None
        longest = max(len(continuation) for _, continuation in pairs)
        if longest > block:
            raise DataError(f"{where}: example {number} has an ending of {longest} tokens, longer than the "
                            f"model's block of {block}; lm-evaluation-harness refuses such endings too")
        requests += pairs
    return requests


def accuracies(examples: list[Example], likelihoods: np.ndarray) -> tuple[float, float]:
    """(acc, acc_norm): how often the likeliest ending, and the likeliest per character, is the label."""
    labels = np.array([example.label for example in examples])
    lengths = np.array([[float(len(ending)) for ending in example.endings] for example in examples])
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty ending: as numpy (and lm-eval) divide
        normalised = likelihoods / lengths
    acc = float(np.mean(likelihoods.argmax(axis=1) == labels))
    acc_norm = float(np.mean(normalised.argmax(axis=1) == labels))
    return acc, acc_norm
