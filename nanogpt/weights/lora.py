"""LoRA: finetune a few low-rank adapters beside frozen weights (``lora.rank=R``).

Each chosen Linear layer W of the blocks (c_attn, c_proj, c_fc; lora.targets)
gets two small matrices, A (rank x in) and B (out x rank), and computes
W x + (alpha / rank) * B A x. B starts at zero, so training starts from the
base model exactly; only A and B train, so the optimizer's moments and the
gradients are those of the adapters alone (under 1% of GPT-2's weights at rank
8 on every layer: 0.95% of gpt2, 0.63% of gpt2-xl). The adapters are Hugging Face ``peft``'s own layers,
put into our GPT by ``peft.inject_adapter_in_model``; model.py knows nothing of them.

A LoRA checkpoint holds the adapters and where the base came from (its
model.init_from and the sha256 of its weights), not the base itself, so a
finetuned GPT-2 XL is megabytes. Loading one (nanogpt/weights/loading.py) reads
the base again, refuses it if its weights changed, and merges the adapters into
it: W + (alpha / rank) * B A, the same model in plain Linear layers (no peft
needed, and as fast as the base). A run started without model.init_from has no
base to read again, so its checkpoints keep every weight.
Nothing here imports Hydra.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from nanogpt.errors import CheckpointError, ConfigError, require_package
from nanogpt.model import GPT, Block, GPTConfig
from nanogpt.options import option, require

log = logging.getLogger("nanogpt.weights")

RECORD = "lora_record"  # the attribute of a GPT with adapters that says how they were made


@functools.cache
def block_linears() -> tuple[str, ...]:
    """The names of the Linear layers inside model.py's blocks: what lora.targets may name."""
    block = Block(GPTConfig(vocab_size=1, block_size=1, n_layer=1, n_head=1, n_embd=1))
    return tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in block.named_modules()
                               if isinstance(module, nn.Linear)))


@dataclass
class LoraConfig:
    """The ``lora`` options: low-rank adapters on frozen weights (off unless rank > 0)."""

    rank: int = option(0, "rank of the adapters; 0: off (every weight trains). With rank > 0 the weights "
                          "are frozen and only the adapters train (needs peft)")
    alpha: float = option(16.0, "the adapters' output is scaled by alpha / rank")
    # peft's default. Dropout keeps a dropped-out copy of each adapted layer's input for the backward
    # pass: 19 MB a layer at gpt2-medium's width and 512 tokens a step (measured: peak RSS of 6 such
    # layers 1,701 MB without, 1,815 MB with dropout 0.05), 0.45 GB for all 24.
    dropout: float = option(0.0, "dropout on the adapters' input during training")
    targets: list[str] = option(default_factory=lambda: list(block_linears()),
                                help="the Linear layers of model.py's blocks that get adapters "
                                     "(attention: c_attn, c_proj; MLP: c_fc, c_proj)")

    def __post_init__(self) -> None:
        require(self.rank >= 0, f"rank={self.rank} must be >= 0 (0 turns LoRA off)")
        require(self.alpha > 0, f"alpha={self.alpha} must be positive")
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        unknown = [name for name in self.targets if name not in block_linears()]
        require(not unknown, f"targets={list(self.targets)}: {', '.join(unknown)} is not a Linear layer of "
                             f"model.py's blocks; choose among {', '.join(block_linears())}")
        require(bool(self.targets), f"targets is empty; choose among {', '.join(block_linears())}")

    def require_packages(self) -> None:
        if self.rank > 0:
            require_package("peft", "peft", f"lora.rank={self.rank}", "peft")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def base_source(init_from: str) -> str:
    """How a checkpoint names its base: a local path made absolute (found from anywhere), else the name."""
    path = Path(init_from).expanduser()
    return str(path.resolve()) if path.exists() else init_from


def weights_sha256(model: GPT) -> str:
    """sha256 of the weights a model computes with: every tensor, in name order, the padded vocabulary cut.

    The padding rows of the vocabulary (model.vocab_multiple) are never looked
    up and are freshly initialised each time, so they are left out; so is the
    output layer, which is the token embedding (tied).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            tensor = tensor[: model.config.vocab_size]
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def add_adapters(model: GPT, cfg: LoraConfig) -> GPT:
    """Put peft's LoRA layers into model (in place) on cfg.targets and freeze every other weight."""
    require_package("peft", "peft", "lora.rank>0", "peft")
    import peft

    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if isinstance(module, nn.Linear)}
    if not set(cfg.targets) & present:
        raise ConfigError(f"lora.rank={cfg.rank}: the model has no {', '.join(cfg.targets)} layers to adapt "
                          f"(its Linear layers: {', '.join(sorted(present)) or 'none'})")
    settings = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=list(cfg.targets), bias="none")
    peft.inject_adapter_in_model(settings, model)
    for name, param in model.named_parameters():  # peft freezes the rest already; say it here too
        param.requires_grad_("lora_" in name)
    return model


def adapt(model: GPT, cfg: LoraConfig, init_from: str | None, dtype: torch.dtype = torch.float32) -> GPT:
    """The model a LoRA run trains: adapters on cfg.targets, the rest frozen; as it was when rank is 0.

    The base's origin and weights' sha256 are kept on the model (RECORD) for
    its checkpoints. Under bfloat16 or float16 autocast the frozen Linear
    weights are stored in that precision: autocast would round them to it for
    every product anyway, so the results are the same and they take half the memory.
    """
    if cfg.rank == 0:
        return model
    base = None if init_from is None else {"source": base_source(init_from), "sha256": weights_sha256(model)}
    add_adapters(model, cfg)
    setattr(model, RECORD, {**asdict(cfg), "base": base})
    if dtype in (torch.bfloat16, torch.float16):
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:  # lm_head is the embedding
                for param in module.parameters(recurse=False):
                    if not param.requires_grad:
                        param.data = param.data.to(dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("lora: rank %d on %s: %s trainable parameters (%.2f%% of %s)", cfg.rank, ", ".join(cfg.targets),
             f"{trainable:,}", 100 * trainable / total, f"{total:,}")
    return model


@contextlib.contextmanager
def adapters_off(model: GPT) -> Iterator[GPT]:
    """The model within the block as its base computes (every adapter switched off, kept as it is).

    What preference tuning and RL measure against: the starting weights, with no second copy.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # and the adapters train again (peft sets requires_grad)


def record(model: GPT) -> dict:
    """What a checkpoint keeps of the adapters ({"lora": ...}); nothing for a model without them."""
    saved = getattr(model, RECORD, None)
    return {} if saved is None else {"lora": saved}


def trainable_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: the adapters when the base can be read again, else all of them."""
    saved = getattr(model, RECORD, None)
    if saved is None or saved["base"] is None:
        return model.state_dict()
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    return {name: value for name, value in model.state_dict().items() if name in trained}


def load_trainable_weights(model: GPT, weights: dict[str, torch.Tensor], saved: dict | None) -> None:
    """Load what trainable_weights() saved into model, refusing adapters made for another base or setting."""
    own = getattr(model, RECORD, None)
    if own is None and saved is None:
        model.load_state_dict(weights)
        return
    if own is None or saved is None or {**own, "base": None} != {**saved, "base": None}:
        raise CheckpointError(f"the checkpoint was trained with lora {settings_text(saved)}, this model has "
                              f"{settings_text(own)}; keep the run's lora settings")
    if (own["base"] or {}).get("sha256") != (saved["base"] or {}).get("sha256"):
        raise CheckpointError(base_changed(saved["base"], own["base"], "this run"))
    if saved["base"] is None:
        model.load_state_dict(weights)
        return
    result = model.load_state_dict(weights, strict=False)
    missing = [name for name in result.missing_keys if "lora_" in name]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"the checkpoint's adapters do not fit this model: missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


def settings_text(saved: dict | None) -> str:
    if saved is None:
        return "off (rank 0)"
    return (f"rank={saved['rank']} alpha={saved['alpha']} dropout={saved['dropout']} "
            f"targets={saved['targets']}")


def base_changed(saved: dict | None, found: dict | None, where: str) -> str:
    """One line: the adapters were made for other base weights than those found."""
    source = (saved or {}).get("source", "a model made from scratch")
    trained_on, now = (saved or {}).get("sha256", "-")[:12], (found or {}).get("sha256", "-")[:12]
    return (f"the LoRA adapters were trained on {source} (weights sha256 {trained_on}), but {where} has "
            f"other weights (sha256 {now}); restore that base or train the adapters again")


def merge_adapters(model: GPT, saved: dict, adapters: dict[str, torch.Tensor]) -> GPT:
    """Add the adapters into model's Linear weights (W + alpha / rank * B A) in place: a plain GPT again."""
    scale = saved["alpha"] / saved["rank"]
    layers = {name.split(".lora_")[0] for name in adapters if ".lora_A." in name}
    with torch.no_grad():
        for layer in sorted(layers):
            a = adapters[f"{layer}.lora_A.default.weight"].float()
            b = adapters[f"{layer}.lora_B.default.weight"].float()
            weight = model.get_submodule(layer).weight
            weight.add_((scale * (b @ a)).to(weight.dtype))
    return model


def base_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-layout state dict (a LoRA run without a base to read) as a plain GPT's, adapters left out."""
    return {name.replace(".base_layer.", "."): value for name, value in weights.items()
            if ".lora_" not in name}
