"""Load a GPT from wherever it lives: one resolver for ``nanogpt.load``, sample, eval, export and init_from.

People arrive with checkpoints in four shapes, and every way into the platform
takes all four, so a model that samples also evaluates, exports and finetunes:

* our run directories (their best.pt, else last.pt) and .pt files, an FSDP
  run's too (its weights assembled whole from the shards beside the file);
* karpathy/nanoGPT's ``out_dir`` or its ``ckpt.pt`` (keys ``model``,
  ``model_args``, ``config``), whose character vocabulary sits in the nanoGPT
  checkout's ``data/<dataset>/meta.pkl``;
* a Hugging Face GPT-2 directory (``save_pretrained``, ``nanogpt.export``);
* one of OpenAI's GPT-2 sizes by name, from the Hugging Face Hub.

open_source() finds out which it is and opens it, its weights unread (each is
read when looked up); resolve_source() turns it into a GPT on the CPU plus its
Tokenizer; initial_model() makes the model a training run starts from
(``model.init_from``), whole or, under FSDP, each process's shards alone,
filled a weight at a time. Nothing here imports Hydra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nanogpt.errors import CheckpointError, ConfigError, UserError, require_package
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime.deferred_init import shapes_only
from nanogpt.runtime.sharding import COMPILED, put_rows
from nanogpt.text.nanogpt_meta import read_char_vocabulary
from nanogpt.text.tokenizers import GPT2_TOKENIZER, Tokenizer, load_tokenizer
from nanogpt.weights import lora
from nanogpt.weights.checkpoint import (
    BEST,
    LAST,
    find_checkpoint,
    is_our_checkpoint,
    read_torch_file,
    weights_of,
    with_weights,
)
from nanogpt.weights.huggingface import (
    PRETRAINED,
    download_pretrained,
    hf_weights,
    require_hub_packages,
)

log = logging.getLogger("nanogpt.weights")

ACCEPTED = (
    "a run directory or .pt file of ours, karpathy/nanoGPT's out_dir or ckpt.pt, a Hugging Face "
    f"GPT-2 directory (save_pretrained, nanogpt.export), or one of {', '.join(PRETRAINED)}"
)
NANOGPT_CKPT = "ckpt.pt"  # what karpathy/nanoGPT's train.py writes into its out_dir
# nanoGPT pads GPT-2's 50257 tokens to 50304; either size without a meta.pkl means GPT-2 BPE.
GPT2_VOCAB_SIZES = (50257, 50304)


@dataclass
class LoadedSource:
    """A model read from some source, with what is known about how it was made."""

    model: GPT  # on the CPU, in training mode as constructed
    tokenizer: Tokenizer  # what turns its text into ids and back
    kind: str  # "run" (ours), "nanoGPT" (karpathy's), "huggingface"
    where: str  # the file, directory or Hub repository that was read
    config: dict = field(default_factory=dict)  # the run's own config, when the source keeps one
    data_dir: Path | None = None  # nanoGPT: the data/<dataset> folder its meta.pkl was found in
    trained_on: dict | None = None  # ours: the prepared data the run trained on (pipeline.data_record)
    chat_template: dict | None = None  # the chat template it was finetuned with (dataset=sft), if any
    iteration: int | None = None  # ours: the training iteration its weights are from (0: untrained)


@dataclass
class Source:
    """A source opened, its weights not yet read: a LoadedSource's facts, with its GPT's shape for the GPT."""

    shape: GPTConfig
    weights: Mapping[str, torch.Tensor]  # our state_dict names; each read when looked up (or mapped: mmap)
    tokenizer: Tokenizer
    kind: str
    where: str
    config: dict = field(default_factory=dict)
    data_dir: Path | None = None
    trained_on: dict | None = None
    chat_template: dict | None = None
    model: GPT | None = None  # built already (a LoRA run's, its adapters merged into the base)
    iteration: int | None = None

    def loaded(self) -> LoadedSource:
        """The source as a GPT on the CPU, with what is known about it."""
        model = self.model
        if model is None:
            model = GPT(self.shape)
            with torch.no_grad():
                for name, target in model.state_dict().items():
                    target.copy_(self.weights[name])
        return LoadedSource(model, self.tokenizer, self.kind, self.where, self.config, self.data_dir,
                            self.trained_on, self.chat_template, self.iteration)


def resolve_source(source: str | Path, key: str = "ckpt", meta: str | Path | None = None) -> LoadedSource:
    """Read the model that source names; key is the setting it came from, for error messages (open_source)."""
    return open_source(source, key, meta).loaded()


def open_source(source: str | Path, key: str = "ckpt", meta: str | Path | None = None) -> Source:
    """Open the model that source names, its weights unread; key is the setting it came from, for messages.

    A path is looked at first (a directory by what it holds, a file by its
    contents), then a GPT-2 name. meta points at a nanoGPT meta.pkl (or the
    folder holding it) when it is not where nanoGPT's sample.py would look.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / BEST).is_file() or (path / LAST).is_file():
            loaded = open_file(find_checkpoint(path), key, meta)
        elif (path / NANOGPT_CKPT).is_file():
            loaded = open_file(path / NANOGPT_CKPT, key, meta)
        elif (path / "config.json").is_file():
            loaded = Source(*hf_weights(path), "huggingface", str(path))
        else:
            raise CheckpointError(
                f"{key}={text} holds no {BEST} or {LAST} (our runs), no {NANOGPT_CKPT} (nanoGPT's "
                "out_dir) and no config.json + model.safetensors (Hugging Face)"
            )
    elif path.is_file():
        loaded = open_file(path, key, meta)
    elif text in PRETRAINED:
        directory = download_pretrained(text, key)
        loaded = Source(*hf_weights(directory), "huggingface", str(directory))
    else:
        raise CheckpointError(
            f"{key}={text} does not exist and is no known model name; {key}= takes {ACCEPTED}"
        )
    if meta is not None and loaded.kind != "nanoGPT":
        raise ConfigError(
            f"meta={meta} is for karpathy/nanoGPT checkpoints; {key}={text} carries its own tokenizer"
        )
    return loaded


def require_source_packages(source: str | Path | None, key: str = "ckpt") -> None:
    """The optional packages reading source needs (a Hugging Face directory or a GPT-2 name), before any work.

    The same order as resolve_source: an existing path is looked at first.
    """
    if source is None:
        return
    path = Path(str(source)).expanduser()
    if path.is_dir():
        ours = any((path / name).is_file() for name in (BEST, LAST, NANOGPT_CKPT))
        if not ours and (path / "config.json").is_file():
            require_package("safetensors", "hf", f"{key}={source} (a Hugging Face directory)")
    elif not path.exists() and str(source) in PRETRAINED:
        require_hub_packages(str(source), key)


def open_file(path: Path, key: str, meta: str | Path | None) -> Source:
    """A .pt file: ours or karpathy/nanoGPT's, told apart by their keys; its tensors mapped, not read."""
    state = read_torch_file(path, mmap=True)
    if is_our_checkpoint(state):
        shape, model = GPTConfig(**state["model_config"]), None
        if state.get("lora"):  # the base read again and the adapters merged: whole, in this process
            model = model_with_adapters(with_weights(state, path), path)
        weights = model.state_dict() if model else weights_of(state, path)
        return Source(shape, weights, load_tokenizer(state["tokenizer"]), "run", str(path),
                      state.get("config") or {}, trained_on=state.get("data"),
                      chat_template=state.get("chat_template"), model=model, iteration=state.get("iter_num"))
    if isinstance(state, dict) and "model" in state and "model_args" in state:
        return open_nanogpt_checkpoint(state, path, meta)
    raise CheckpointError(
        f"{key}={path} is not a nanogpt checkpoint (no model_config) nor karpathy/nanoGPT's (no model_args)"
    )


def model_with_adapters(state: dict, path: Path) -> GPT:
    """A LoRA checkpoint's model: its base read again (and checked unchanged), the adapters merged in."""
    saved = state["lora"]
    config = GPTConfig(**state["model_config"])
    if saved["base"] is None:  # trained from scratch: the checkpoint holds every weight
        model = GPT(config)
        model.load_state_dict(lora.base_weights(state["model"]))
    else:
        source = saved["base"]["source"]
        try:
            model, _ = load_pretrained(source, block_size=config.block_size, dropout=config.dropout,
                                       vocab_multiple=config.vocab_multiple)
        except UserError as e:
            raise CheckpointError(f"{path} holds LoRA adapters for the base {source}, which cannot be read: "
                                  f"{e}") from None
        found = lora.weights_sha256(model)
        if found != saved["base"]["sha256"]:
            raise CheckpointError(f"{path}: " + lora.base_changed(saved["base"], {"sha256": found}, source))
    return lora.merge_adapters(model, saved, state["model"])


# karpathy/nanoGPT --------------------------------------------------------------------------------


def open_nanogpt_checkpoint(state: dict, path: Path, meta: str | Path | None) -> Source:
    """A nanoGPT ckpt.pt as our GPT's shape and weights, and its vocabulary.

    nanoGPT's model is GPT-2's with exact GELU, and its parameters have our
    names. A model saved after torch.compile prefixes them with ``_orig_mod.``;
    older nanoGPT versions also save the causal mask as a buffer named
    ``attn.bias``, which is not a weight.
    """
    args = state["model_args"]
    config = GPTConfig(
        vocab_size=args["vocab_size"], block_size=args["block_size"], n_layer=args["n_layer"],
        n_head=args["n_head"], n_embd=args["n_embd"], bias=args.get("bias", True), dropout=0.0,
    )
    weights = {name.removeprefix("_orig_mod."): value for name, value in state["model"].items()}
    weights = {name: value for name, value in weights.items() if not name.endswith(".attn.bias")}
    try:  # names and shapes checked, nothing read or allocated
        shapes_only(lambda: GPT(config)).load_state_dict(weights, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit nanoGPT's GPT of its model_args: {e}") from None
    run_config = state.get("config") or {}
    tokenizer, data_dir = nanogpt_vocabulary(path, run_config.get("dataset"), config.vocab_size, meta)
    return Source(config, weights, tokenizer, "nanoGPT", str(path), run_config, data_dir)


def nanogpt_vocabulary(
    ckpt: Path, dataset: str | None, vocab_size: int, meta: str | Path | None
) -> tuple[Tokenizer, Path | None]:
    """The tokenizer of a nanoGPT checkpoint and the data folder its meta.pkl is in.

    Looked for where nanoGPT's sample.py looks, data/<dataset>/meta.pkl under the
    current directory, then in the checkout the out_dir sits in; meta overrides
    both. Without one, GPT-2 BPE, as nanoGPT assumes, if the vocabulary has its size.
    """
    if meta is not None:
        candidates = [Path(meta).expanduser()]
        candidates = [candidates[0] / "meta.pkl" if candidates[0].is_dir() else candidates[0]]
    elif dataset:
        checkout = ckpt.resolve().parent.parent
        candidates = [Path("data") / dataset / "meta.pkl", checkout / "data" / dataset / "meta.pkl"]
    else:
        candidates = []
    for candidate in candidates:
        if candidate.is_file():
            return read_char_vocabulary(candidate), candidate.parent
    if meta is not None:
        raise CheckpointError(f"meta={meta}: no meta.pkl there")
    if vocab_size in GPT2_VOCAB_SIZES:
        return load_tokenizer(GPT2_TOKENIZER), None
    looked = ", ".join(str(c.resolve()) for c in candidates) or "nowhere (its config names no dataset)"
    raise CheckpointError(
        f"{ckpt} is a nanoGPT checkpoint with a {vocab_size}-token vocabulary, but no meta.pkl was found "
        f"(looked in {looked}); run from the nanoGPT checkout that trained it, or give meta=PATH/meta.pkl "
        "(nanogpt.load(..., meta=PATH) in Python)"
    )


# Starting a training run from a source (model.init_from) --------------------------------------


def load_pretrained(
    source: str,
    block_size: int | None = None,
    dropout: float = 0.0,
    vocab_multiple: int = 1,
    gradient_checkpointing: bool = False,
) -> tuple[GPT, Tokenizer]:
    """(model, its tokenizer) to start training from, for ``model.init_from=SOURCE``."""
    return Pretrained.open(source, block_size, dropout, vocab_multiple, gradient_checkpointing).model()


@dataclass
class Pretrained:
    """model.init_from's source, opened, and the shape a run trains it in."""

    source: Source
    config: GPTConfig

    @classmethod
    def open(cls, source: str, block_size: int | None = None, dropout: float = 0.0, vocab_multiple: int = 1,
             gradient_checkpointing: bool = False) -> Pretrained:
        """The source opened to start training from; its weights are read only by model().

        The shape comes from the weights; block_size crops the learned positions
        (the model then reads at most that many tokens), dropout replaces the
        source's for finetuning, and vocab_multiple pads the vocabulary (the padded
        rows keep their fresh initialisation; they are never looked up).
        """
        opened = open_source(source, key="model.init_from")
        trained = opened.shape
        if block_size is not None and block_size > trained.block_size:
            raise ConfigError(
                f"model.block_size={block_size} is longer than the {trained.block_size} positions "
                f"{source} was trained with; use model.block_size<={trained.block_size}"
            )
        config = replace(
            trained, block_size=block_size or trained.block_size, dropout=dropout,
            vocab_multiple=vocab_multiple, gradient_checkpointing=gradient_checkpointing,
        )
        return cls(opened, config)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.source.tokenizer

    def model(self, new_model: Callable[[GPTConfig], GPT] = GPT) -> tuple[GPT, Tokenizer]:
        """(model, tokenizer): new_model's fresh GPT (whole, or this process's shards), the weights put in.

        Each weight is read in turn and its rows copied (this process's alone,
        when sharded), cropping the positions or leaving the padded rows fresh.
        """
        model = new_model(self.config)
        for name, target in model.named_parameters():
            put_rows(target, self.source.weights[name.replace(COMPILED, "")])
        return model, self.source.tokenizer


def pretrained_base(model_cfg) -> Pretrained | None:
    """model.init_from opened as a run trains it (its block_size, dropout...), weights unread; or None."""
    if model_cfg.init_from is None:
        return None
    log.info("model: initialised from %s (shape taken from the weights)", model_cfg.init_from)
    return Pretrained.open(
        model_cfg.init_from, block_size=model_cfg.block_size, dropout=model_cfg.dropout,
        vocab_multiple=model_cfg.vocab_multiple, gradient_checkpointing=model_cfg.gradient_checkpointing,
    )


def initial_model(model_cfg, vocab_size: int, tokenizer: Tokenizer, base: Pretrained | None = None,
                  new_model: Callable[[GPTConfig], GPT] = GPT) -> GPT:
    """The GPT a run starts from: fresh, of model_cfg's shape (a ModelConfig), or model.init_from's weights.

    new_model makes the fresh GPT (whole, or under FSDP this process's shards:
    Runtime.new_model). Pretrained weights (base, if pretrained_base() already
    opened them) must come with the dataset's tokenizer.
    """
    if model_cfg.init_from is None:
        return new_model(model_cfg.gpt_config(vocab_size=vocab_size))
    base = base or pretrained_base(model_cfg)
    if base.tokenizer != tokenizer:
        raise ConfigError(
            f"model.init_from={model_cfg.init_from} was trained with tokenizer {base.tokenizer.name}, "
            f"but the dataset uses {tokenizer.name}; pick a dataset with the same tokenizer "
            "(e.g. dataset=shakespeare for GPT-2)")
    return base.model(new_model)[0]
