"""Each extension point is one place: a model option, a dataset source, a tokenizer, a logger.

docs/changing-the-code.md names the files for each; these tests add one of each the
way that table says (a command is covered by tests/test_scripts.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt.dataset.config import LOADERS, DatasetConfig
from nanogpt.dataset.pipeline import SOURCES, prepare_dataset
from nanogpt.dataset.sources import Source
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime.device import DeviceConfig
from nanogpt.text.tokenizers import TOKENIZERS, Tokenizer, load_tokenizer
from nanogpt.tracking.loggers import LOGGERS, Logger, LoggerConfig
from nanogpt.training.config import ModelConfig, TrainConfig
from nanogpt.training.setup import build_trainer

BASE = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def another_value(f: dataclasses.Field):
    """A value of GPTConfig's field f other than its default, that still makes a valid model."""
    choices = f.metadata.get("choices")
    if choices:
        return next(choice for choice in choices if choice != f.default)
    if isinstance(f.default, bool):
        return not f.default
    return {"block_size": 32, "n_layer": 3, "n_head": 4, "n_embd": 32, "dropout": 0.1,
            "vocab_multiple": 64, "logit_softcap": 30.0}[f.name]


MODEL_FIELDS = [f for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]


@pytest.mark.parametrize("field", MODEL_FIELDS, ids=lambda f: f.name)
def test_a_model_option_is_a_variant_exactly_when_gpt2_cannot_carry_it(field, tmp_path):
    """Export every option set away from its default: GPT-2 computes our logits, or the option is a variant.

    So which options are architecture variants (declared variant=True on the field)
    is proven against transformers' own GPT-2, not kept as a list by hand.
    """
    transformers = pytest.importorskip("transformers")
    from nanogpt.weights.huggingface import export_model

    config = dataclasses.replace(BASE, **{field.name: another_value(field)})
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, 0.2)
    tokenizer = load_tokenizer({"kind": "ids", "vocab_size": 50})
    if field.metadata.get("variant"):
        assert config.variants == {field.name: getattr(config, field.name)}
        with pytest.raises(CheckpointError, match=f"model.{field.name}="):
            export_model(model, tokenizer, tmp_path / "hf")
        with pytest.raises(ConfigError, match=f"model.{field.name}="):
            ModelConfig(init_from="gpt2", **{field.name: getattr(config, field.name)})
        return
    assert config.variants == {}
    export_model(model, tokenizer, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours, _ = model(idx, idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)


class ReversedLines(Source):
    """A source written for this test: the lines of a text file, each reversed, the last tenth validating."""

    def __init__(self, source: str):
        self.path = Path(source)

    @classmethod
    def from_config(cls, config: DatasetConfig) -> Source:
        return cls(config.source)

    def fingerprint(self) -> dict:
        return {"file": str(self.path), "size": self.path.stat().st_size}

    def prepare(self, config: DatasetConfig, directory: Path, tokenizer: dict | None, processes: int) -> dict:
        text = "\n".join(line[::-1] for line in self.path.read_text().splitlines())
        description = {"kind": "char", "vocabulary": sorted(set(text))}
        ids = np.array(load_tokenizer(description).encode(text), dtype=np.uint16)
        cut = int(len(ids) * (1 - config.val_fraction))
        ids[:cut].tofile(directory / "train.bin")
        ids[cut:].tofile(directory / "val.bin")
        return {"tokenizer": description, "vocab_size": len(description["vocabulary"]), "dtype": "uint16",
                "train_tokens": cut, "val_tokens": len(ids) - cut}


def test_every_loader_has_its_class():
    assert set(SOURCES) == set(LOADERS)


def test_a_dataset_source_is_one_class_and_its_name(corpus, data_root, monkeypatch):
    monkeypatch.setitem(LOADERS, "reversed_lines_test", "each line of a text file, reversed")
    monkeypatch.setitem(SOURCES, "reversed_lines_test", ReversedLines)
    config = DatasetConfig(name="reversed", source=str(corpus), loader="reversed_lines_test")
    data = prepare_dataset(config, data_root)
    decode = load_tokenizer(data.meta["tokenizer"]).decode
    first_line = corpus.read_text().splitlines()[0]
    assert decode(data.tokens("train")[: len(first_line)].tolist()) == first_line[::-1]
    with pytest.raises(ConfigError, match="loader='reversed_lines'"):
        DatasetConfig(name="x", source="y", loader="reversed_lines")


class ShoutingTokenizer(Tokenizer):
    """A tokenizer kind written for this test: upper-case letters and space, named ``shout``."""

    kind = "shout_test"
    alphabet = " ABCDEFGHIJKLMNOPQRSTUVWXYZ"

    @classmethod
    def names(cls, name: str) -> bool:
        return name == "shout"

    @classmethod
    def describe(cls, name: str) -> dict:
        return {"kind": cls.kind}

    def __init__(self, description: dict):
        super().__init__(description)
        self.vocab_size = len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(ch) for ch in text.upper() if ch in self.alphabet]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def test_a_tokenizer_is_one_class(corpus, data_root):
    assert TOKENIZERS["shout_test"] is ShoutingTokenizer
    data = prepare_dataset(DatasetConfig(name="shout", source=str(corpus), tokenizer="shout"), data_root)
    assert data.meta["tokenizer"] == {"kind": "shout_test"} and data.vocab_size == 27
    assert ShoutingTokenizer({}).decode(data.tokens("train")[:10].tolist()) == "ROMEO I AM"


class ListLogger(Logger):
    """A logger written for this test: it keeps what it is given in a list."""

    name = "list_test"
    runs: list[ListLogger] = []

    @classmethod
    def start(cls, config, run_dir, resolved_config, purge_step=0) -> Logger:
        cls.runs.append(cls())
        return cls.runs[-1]

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []
        self.finished = False

    def log(self, record: dict, step: int) -> None:
        self.logged.append((step, record))

    def finish(self) -> None:
        self.finished = True


def test_a_logger_is_one_class(corpus, data_root, tmp_path):
    assert LOGGERS["list_test"] is ListLogger
    config = TrainConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0),
                         dataset=DatasetConfig(name="log", source=str(corpus)),
                         device=DeviceConfig(name="cpu"),
                         logger=LoggerConfig(name="list_test"), data_root=str(data_root), batch_size=2,
                         max_iters=4, eval_interval=2, eval_iters=1, log_interval=2, sample_tokens=0,
                         save_checkpoints=False)
    build_trainer(config, tmp_path / "run").run()
    logger = ListLogger.runs[-1]
    assert logger.finished
    assert [(step, record["kind"]) for step, record in logger.logged] == [
        (0, "eval"), (0, "train"), (2, "eval"), (2, "train"), (4, "eval")]
