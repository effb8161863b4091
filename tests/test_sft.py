"""Instruction data (dataset=sft): the template, the answers-only mask, the split, batches and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt.dataset.batches import BatchSampler
from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.pipeline import prepare_dataset
from nanogpt.errors import ConfigError, DataError
from nanogpt.text.chat_template import ChatTemplate
from nanogpt.text.tokenizers import GPT2_TOKENIZER, load_tokenizer

# Tiny Shakespeare's 65 characters: what a character-level Shakespeare base can read.
SHAKESPEARE_CHARS = list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
CHAR_BASE = {"kind": "char", "vocabulary": SHAKESPEARE_CHARS}

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who art thou?"},
    {"role": "assistant", "content": "A player."},
    {"role": "user", "content": "And now?"},
    {"role": "assistant", "content": "Gone."},
]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def prepare(path: Path, data_root: Path, tokenizer: str = "char", model: dict | None = CHAR_BASE,
            val_fraction: float = 0.2):
    config = DatasetConfig(name="sft_test", source=str(path), tokenizer=tokenizer, loader="sft",
                           val_fraction=val_fraction)
    return prepare_dataset(config, data_root, model and load_tokenizer(model))


def examples_of(data, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, learned) of each prepared example of a split, from the files on disk."""
    ids = np.fromfile(data.directory / f"{split}.bin", dtype=data.dtype)
    learned = np.fromfile(data.directory / f"{split}.mask.bin", dtype=np.uint8)
    offsets = np.fromfile(data.directory / f"{split}.offsets.bin", dtype=np.int64)
    return [(ids[a:b], learned[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def spans(ids: np.ndarray, learned: np.ndarray, decode) -> list[str]:
    """The decoded runs of learned tokens: what the loss covers."""
    runs, current = [], []
    for token, learn in zip(ids.tolist(), learned.tolist(), strict=True):
        if learn:
            current.append(token)
        elif current:
            runs.append(decode(current))
            current = []
    return runs + ([decode(current)] if current else [])


def test_examples_follow_the_template_and_only_answers_are_learned(tmp_path, data_root):
    pairs = [{"prompt": f"reverse: word{c}", "response": f"{c}drow"} for c in "abcdefgh"]
    data = prepare(write_jsonl(tmp_path / "a.jsonl", [*pairs, CONVERSATION, "", pairs[0]]), data_root)
    decode = load_tokenizer(CHAR_BASE).decode
    found = examples_of(data, "train") + examples_of(data, "val")
    assert data.meta["examples"] == {"train": 8, "val": 2}  # 10 examples (a blank line is none), 20% held out
    assert data.meta["chat_template"] == ChatTemplate().record()
    texts = sorted(decode(ids.tolist()) for ids, _ in found)
    assert "User: reverse: wordc\nAssistant: cdrow\n\n" in texts
    assert ("System: Be brief.\nUser: Who art thou?\nAssistant: A player.\n\n"
            "User: And now?\nAssistant: Gone.\n\n" in texts)
    for ids, learned in found:  # the answer, its leading space and the end (a blank line here) are learned
        text = decode(ids.tolist())
        expected = ([" A player.\n\n", " Gone.\n\n"] if text.startswith("System")
                    else [text.split("Assistant:")[1]])
        assert spans(ids, learned, decode) == expected
    assert data.meta["answer_tokens"]["train"] + data.meta["answer_tokens"]["val"] == sum(
        int(learned.sum()) for _, learned in found)


def test_gpt2_examples_end_with_the_end_of_text_token(tmp_path, data_root, bpe_cache):
    data = prepare(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Say hi", "response": "Hello there."},
                                                      CONVERSATION]),
                   data_root, tokenizer="gpt2", model=None, val_fraction=0.5)
    assert data.meta["tokenizer"] == GPT2_TOKENIZER
    codec = load_tokenizer(GPT2_TOKENIZER)
    encode, decode = codec.encode, codec.decode
    for ids, learned in examples_of(data, "train") + examples_of(data, "val"):
        assert ids[-1] == 50256 and learned[-1] == 1  # every example ends with <|endoftext|>, learned
        runs = spans(ids, learned, decode)
        assert runs in ([" Hello there.<|endoftext|>"], [" A player.<|endoftext|>", " Gone.<|endoftext|>"])
        # The prompt is one piece and the answer another, exactly as chat encodes them.
        prompt = decode(ids[: int(np.argmax(learned))].tolist())
        assert prompt.endswith("Assistant:") and ids[: len(encode(prompt))].tolist() == encode(prompt)


def test_the_base_tokenizer_decides_and_a_mismatch_is_one_line(tmp_path, data_root, bpe_cache):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "response": "b"}] * 5)
    with pytest.raises(ConfigError, match=r"dataset.tokenizer=gpt2 does not match the base model, which was "
                                          r"trained with char \(65 characters\); set dataset.tokenizer=char"):
        prepare(path, data_root, tokenizer="gpt2", model=CHAR_BASE)
    with pytest.raises(ConfigError, match="set dataset.tokenizer=gpt2"):
        prepare(path, data_root, tokenizer="char", model=GPT2_TOKENIZER)
    with pytest.raises(ConfigError, match="takes its characters from the base model"):
        prepare(path, data_root, tokenizer="char", model=None)
    # Another base's characters are another dataset: the cache is rebuilt, not reused.
    first = prepare(path, data_root)
    other = prepare(path, data_root, model={"kind": "char", "vocabulary": sorted(set("User: a\nAssistnt:b"))})
    assert first.meta["tokenizer"] != other.meta["tokenizer"] and other.vocab_size == 13
    with pytest.raises(DataError, match=r"13-character vocabulary cannot encode 1 character\(s\) .*'y'"):
        prepare(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "response": "by"}] * 5), data_root,
                model=other.meta["tokenizer"])


BAD_LINES = [
    ('{"prompt": "a"}', r'a line needs "prompt" and "response", or "messages" \(its keys: \'prompt\'\)'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 1 has role 'robot'; the roles are system, "
                                                          "user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
     '{"role": "user", "content": "z"}]}', "the conversation ends with a user turn"),
    ('{"prompt": "a", "response": "  "}', "the response is empty"),
    ('{"prompt": "a", "response": 3}', '"prompt" and "response" must be strings'),
    ("prompt: a", "not valid JSON"),
    ('{"prompt": "a", "response": "one\\n\\nother"}', "the response contains a blank line"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_a_bad_line_is_named_by_file_and_number_and_leaves_nothing(line, message, tmp_path, data_root):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "fine", "response": "yes"}', line])
    with pytest.raises(DataError, match=f"^{path}:2: {message}"):
        prepare(path, data_root)
    assert list(data_root.iterdir()) == []  # no cache folder, no lock file: the refusal made them


def test_characters_a_character_base_cannot_encode_are_listed(tmp_path, data_root):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "fine", "response": "yes"},
                                              {"prompt": "café #1", "response": "ok"}])
    with pytest.raises(DataError, match=r"cannot encode 3 character\(s\) of dataset.source: '#' \(U\+0023, "
                                        rf"{path}:2\), '1' \(U\+0031, {path}:2\), 'é' \(U\+00E9, {path}:2\)"):
        prepare(path, data_root)


def test_batches_hold_one_example_a_row_with_only_answers_as_targets(tmp_path, data_root, caplog):
    long_prompt = "so " * 30  # longer than the block: cut from the left
    records = [{"prompt": f"reverse: w{c}", "response": f"{c}w"} for c in "abcdefghijklmnopqrst"]
    records.append({"prompt": long_prompt, "response": "the end"})
    data = prepare(write_jsonl(tmp_path / "a.jsonl", records), data_root, val_fraction=0.1)
    decode = load_tokenizer(CHAR_BASE).decode
    with caplog.at_level(logging.INFO, logger="nanogpt.data"):
        sampler = BatchSampler(data, block_size=32, batch_size=8, device=torch.device("cpu"), seed=1)
    cut = [r for r in caplog.records if "longer than block_size + 1 = 33 tokens" in r.getMessage()]
    assert len(cut) == 1 and cut[0].getMessage().startswith("sft: 1 of")
    answers = {f" {c}w\n\n" for c in "abcdefghijklmnopqrst"} | {" the end\n\n"}
    seen = set()
    for split in ["train", "val"] * 20:
        x, y = sampler.get_batch(split)
        assert x.shape == y.shape and x.shape[0] == 8 and x.shape[1] <= 32 and x.dtype == torch.int64
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            learned = [t for t in row_y if t != -1]
            seen.add(decode(learned))
            # Inputs are the example shifted by one, padded at the end; targets after the example are masked.
            n = max(i for i, t in enumerate(row_y) if t != -1) + 1
            assert row_y[n:] == [-1] * (len(row_y) - n)
            assert decode(row_x[:n] + [row_y[n - 1]]).endswith(decode(learned))
    assert seen <= answers and " the end\n\n" in seen  # the long example keeps its whole answer


def test_every_rank_draws_its_own_rows_of_the_single_process_batch(tmp_path, data_root):
    records = [{"prompt": "x" * (i % 7), "response": "answer " + "y" * i} for i in range(30)]
    data = prepare(write_jsonl(tmp_path / "a.jsonl", records), data_root)
    single = BatchSampler(data, 32, 4, torch.device("cpu"), seed=3)
    ranks = [BatchSampler(data, 32, 2, torch.device("cpu"), seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        _, expected = single.get_batch("train")
        shares = [sampler.get_batch("train")[1] for sampler in ranks]
        width = expected.shape[1]
        padded = [torch.nn.functional.pad(s, (0, width - s.shape[1]), value=-1) for s in shares]
        assert torch.equal(torch.cat(padded), expected)


def test_plain_text_datasets_are_batched_as_before(corpus, data_root):
    data = prepare_dataset(DatasetConfig(name="plain", source=str(corpus)), data_root)
    sampler = BatchSampler(data, 16, 4, torch.device("cpu"), seed=0)
    x, y = sampler.get_batch("train")
    assert sampler.examples is None and x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_a_long_conversation_keeps_its_newest_turns_within_the_budget():
    template = ChatTemplate()
    codec = load_tokenizer(CHAR_BASE)
    encode, decode = codec.encode, codec.decode
    messages = [{"role": "system", "content": "Be brief."}]
    for c in "abcdefghij":
        messages += [{"role": "user", "content": f"question {c}"},
                     {"role": "assistant", "content": f"answer {c}"}]
    messages.append({"role": "user", "content": "last one"})
    ids, dropped, _ = template.prompt(messages, encode, budget=130)
    text = decode(ids)
    assert len(ids) <= 130 and dropped == 16  # 8 of the 10 turns, each a question with its answer
    assert text.startswith("System: Be brief.\n") and text.endswith("User: last one\nAssistant:")
    assert "question a" not in text and "answer j" in text
    # A single message longer than the budget loses its beginning, as a long training example does.
    ids, _, cut = template.prompt([{"role": "user", "content": "a" * 200}], encode, budget=50)
    assert len(ids) == 50 and cut > 0 and decode(ids).endswith("aaa\nAssistant:")


def test_two_unnamed_files_get_their_own_caches_and_another_base_prepares_again(tmp_path, data_root):
    pair = {"prompt": "reverse: abc", "response": "cba"}
    first = write_jsonl(tmp_path / "a.jsonl", [pair] * 5)
    second = write_jsonl(tmp_path / "b.jsonl", [pair] * 6)

    def unnamed(path: Path, model: dict):
        return prepare_dataset(DatasetConfig(source=str(path), tokenizer="char", loader="sft",
                                             val_fraction=0.2), data_root, load_tokenizer(model))

    a, b = unnamed(first, CHAR_BASE), unnamed(second, CHAR_BASE)
    assert a.directory != b.directory and a.directory.name.startswith("sft-a-")
    assert unnamed(first, CHAR_BASE).meta["tokens_sha256"] == a.meta["tokens_sha256"]  # the cache is reused
    # A base with another character order gives other ids: the cache is not taken for it.
    other_base = {"kind": "char", "vocabulary": list(reversed(SHAKESPEARE_CHARS))}
    assert unnamed(first, other_base).meta["tokens_sha256"] != a.meta["tokens_sha256"]
