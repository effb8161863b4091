"""Load a GPT from wherever it lives: one resolver for ``nanogpt.load``, sample, eval and init_from.

People arrive with checkpoints in four shapes, and every way into the platform
takes all four, so a model that samples also evaluates, exports and finetunes:

* our run directories (their best.pt, else last.pt) and .pt files;
* karpathy/nanoGPT's ``out_dir`` or its ``ckpt.pt`` (keys ``model``,
  ``model_args``, ``config``), whose character vocabulary sits in the nanoGPT
  checkout's ``data/<dataset>/meta.pkl``;
* a Hugging Face GPT-2 directory (``save_pretrained``, ``nanogpt.export``);
* one of OpenAI's GPT-2 sizes by name, from the Hugging Face Hub.

resolve_source() turns any of them into a GPT on the CPU plus its tokenizer
description (what data.tokenizer_codec reads). load() wraps that for Python
users: text in, text out. Nothing here imports Hydra.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nanogpt.checkpoint import BEST, LAST, build_model, find_checkpoint, is_our_checkpoint, read_torch_file
from nanogpt.data import UnknownTokenError, tokenizer_codec
from nanogpt.device import autocast, resolve_device, resolve_dtype
from nanogpt.errors import CheckpointError, ConfigError, DataError
from nanogpt.model import GPT, GPTConfig
from nanogpt.pickles import read_nanogpt_meta_pkl
from nanogpt.quantize import QUANTIZATIONS, quantize_model
from nanogpt.tokenizer import GPT2_TOKENIZER

# OpenAI's GPT-2 releases and their Hugging Face Hub repositories.
PRETRAINED = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
ACCEPTED = (
    "a run directory or .pt file of ours, karpathy/nanoGPT's out_dir or ckpt.pt, a Hugging Face "
    f"GPT-2 directory (save_pretrained, nanogpt.export), or one of {', '.join(PRETRAINED)}"
)
NANOGPT_CKPT = "ckpt.pt"  # what karpathy/nanoGPT's train.py writes into its out_dir
# nanoGPT pads GPT-2's 50257 tokens to 50304; either size without a meta.pkl means GPT-2 BPE.
GPT2_VOCAB_SIZES = (50257, 50304)
# Hugging Face's names for GELU -> the approximate= setting of torch's GELU.
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# Weights stored by Hugging Face's Conv1D as (in, out): transposed relative to nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Written beside an export: the tokenizer the weights were trained with.
TOKENIZER_FILE = "nanogpt_tokenizer.json"


@dataclass
class LoadedSource:
    """A model read from some source, with what is known about how it was made."""

    model: GPT  # on the CPU, in training mode as constructed
    tokenizer: dict  # the description data.tokenizer_codec reads
    kind: str  # "run" (ours), "nanoGPT" (karpathy's), "huggingface"
    where: str  # the file, directory or Hub repository that was read
    config: dict = field(default_factory=dict)  # the run's own config, when the source keeps one
    data_dir: Path | None = None  # nanoGPT: the data/<dataset> folder its meta.pkl was found in


def resolve_source(source: str | Path, key: str = "ckpt", meta: str | Path | None = None) -> LoadedSource:
    """Read the model that source names; key is the setting it came from, for error messages.

    A path is looked at first (a directory by what it holds, a file by its
    contents), then a GPT-2 name. meta points at a nanoGPT meta.pkl (or the
    folder holding it) when it is not where nanoGPT's sample.py would look.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / BEST).is_file() or (path / LAST).is_file():
            loaded = read_file(find_checkpoint(path), key, meta)
        elif (path / NANOGPT_CKPT).is_file():
            loaded = read_file(path / NANOGPT_CKPT, key, meta)
        elif (path / "config.json").is_file():
            loaded = read_hf_directory(path)
        else:
            raise CheckpointError(
                f"{key}={text} holds no {BEST} or {LAST} (our runs), no {NANOGPT_CKPT} (nanoGPT's "
                "out_dir) and no config.json + model.safetensors (Hugging Face)"
            )
    elif path.is_file():
        loaded = read_file(path, key, meta)
    elif text in PRETRAINED:
        loaded = read_hf_directory(download_pretrained(text, key))
    else:
        raise CheckpointError(
            f"{key}={text} does not exist and is no known model name; {key}= takes {ACCEPTED}"
        )
    if meta is not None and loaded.kind != "nanoGPT":
        raise ConfigError(
            f"meta={meta} is for karpathy/nanoGPT checkpoints; {key}={text} carries its own tokenizer"
        )
    return loaded


def read_file(path: Path, key: str, meta: str | Path | None) -> LoadedSource:
    """A .pt file: ours or karpathy/nanoGPT's, told apart by their keys."""
    state = read_torch_file(path)
    if is_our_checkpoint(state):
        config = state.get("config") or {}
        return LoadedSource(build_model(state), state["tokenizer"], "run", str(path), config)
    if isinstance(state, dict) and "model" in state and "model_args" in state:
        return read_nanogpt_checkpoint(state, path, meta)
    raise CheckpointError(
        f"{key}={path} is not a nanogpt checkpoint (no model_config) nor karpathy/nanoGPT's (no model_args)"
    )


# karpathy/nanoGPT --------------------------------------------------------------------------------


def read_nanogpt_checkpoint(state: dict, path: Path, meta: str | Path | None) -> LoadedSource:
    """Our GPT with the weights of a nanoGPT ckpt.pt, and its vocabulary.

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
    model = GPT(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit nanoGPT's GPT of its model_args: {e}") from None
    run_config = state.get("config") or {}
    tokenizer, data_dir = nanogpt_vocabulary(path, run_config.get("dataset"), config.vocab_size, meta)
    return LoadedSource(model, tokenizer, "nanoGPT", str(path), run_config, data_dir)


def nanogpt_vocabulary(
    ckpt: Path, dataset: str | None, vocab_size: int, meta: str | Path | None
) -> tuple[dict, Path | None]:
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
            return char_tokenizer_from_meta(read_nanogpt_meta_pkl(candidate), candidate), candidate.parent
    if meta is not None:
        raise CheckpointError(f"meta={meta}: no meta.pkl there")
    if vocab_size in GPT2_VOCAB_SIZES:
        return GPT2_TOKENIZER, None
    looked = ", ".join(str(c.resolve()) for c in candidates) or "nowhere (its config names no dataset)"
    raise CheckpointError(
        f"{ckpt} is a nanoGPT checkpoint with a {vocab_size}-token vocabulary, but no meta.pkl was found "
        f"(looked in {looked}); run from the nanoGPT checkout that trained it, or give meta=PATH/meta.pkl "
        "(nanogpt.load(..., meta=PATH) in Python)"
    )


def char_tokenizer_from_meta(meta: dict, path: Path) -> dict:
    """Our character-vocabulary description from nanoGPT's {'itos': {id: char}, ...}."""
    itos = meta.get("itos")
    if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))):
        raise CheckpointError(f"{path} has no itos table numbering its tokens 0, 1, 2, ...")
    vocabulary = [itos[i] for i in range(len(itos))]
    if not all(isinstance(token, str) and len(token) == 1 for token in vocabulary):
        raise CheckpointError(f"{path} is not a character vocabulary (its tokens are not single characters)")
    return {"kind": "char", "vocabulary": vocabulary}


# Hugging Face ------------------------------------------------------------------------------------


def download_pretrained(name: str, key: str) -> Path:
    """The local directory of one of OpenAI's sizes, from the Hub (or its cache when offline)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f'{key}={name} needs huggingface_hub: pip install -e ".[hf]"') from None
    try:
        return Path(snapshot_download(PRETRAINED[name], allow_patterns=["config.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 (the Hub raises many kinds: offline, not found, rate-limited)
        raise ConfigError(
            f"{key}={name}: could not download {PRETRAINED[name]} from the Hugging Face Hub "
            f"({type(e).__name__}); offline, give {key}= a local directory holding config.json and "
            "model.safetensors"
        ) from None


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


def read_hf_directory(directory: Path) -> LoadedSource:
    """Our GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors).

    Hugging Face keeps GPT-2's Conv1D layers, whose weights are the transpose
    of nn.Linear's; GPT-2 was trained with the tanh GELU, which config_from_hf
    selects so the logits are the original's.
    """
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError(f'reading {directory} needs safetensors: pip install -e ".[hf]"') from None
    weights_file = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights_file.is_file():
        raise CheckpointError(
            f"{directory} must hold config.json and model.safetensors (as save_pretrained writes them)"
        )
    config = config_from_hf(json.loads((directory / "config.json").read_text()), directory)
    hf_state = {key.removeprefix("transformer."): value for key, value in load_file(weights_file).items()}
    model = GPT(config)
    with torch.no_grad():
        for key, target in model.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            hf_key = key.removeprefix("transformer.")
            if hf_key not in hf_state:
                raise CheckpointError(f"{weights_file} has no tensor {hf_key}; is it a GPT-2 checkpoint?")
            value = hf_state[hf_key]
            target.copy_(value.t() if hf_key.endswith(CONV1D_WEIGHTS) else value)
    tokenizer_file = directory / TOKENIZER_FILE
    tokenizer = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else GPT2_TOKENIZER
    return LoadedSource(model, tokenizer, "huggingface", str(directory))


# Starting a training run from a source (model.init_from) --------------------------------------


def load_pretrained(
    source: str,
    block_size: int | None = None,
    dropout: float = 0.0,
    vocab_multiple: int = 1,
    gradient_checkpointing: bool = False,
) -> tuple[GPT, dict]:
    """(model, tokenizer description) to start training from, for ``model.init_from=SOURCE``.

    The shape comes from the weights; block_size crops the learned positions
    (the model then reads at most that many tokens), dropout replaces the
    source's for finetuning, and vocab_multiple pads the vocabulary (the padded
    rows keep their fresh initialisation; they are never looked up).
    """
    loaded = resolve_source(source, key="model.init_from")
    trained = loaded.model.config
    if block_size is not None and block_size > trained.block_size:
        raise ConfigError(
            f"model.block_size={block_size} is longer than the {trained.block_size} positions "
            f"{source} was trained with; use model.block_size<={trained.block_size}"
        )
    config = replace(
        trained, block_size=block_size or trained.block_size, dropout=dropout,
        vocab_multiple=vocab_multiple, gradient_checkpointing=gradient_checkpointing,
    )
    model = GPT(config)
    weights = loaded.model.state_dict()
    with torch.no_grad():
        for key, target in model.state_dict().items():
            rows = min(target.shape[0], weights[key].shape[0])  # crops positions, pads the vocabulary
            target[:rows].copy_(weights[key][:rows])
    return model, loaded.tokenizer


def initial_model(model_cfg, tokenizer: dict) -> GPT:
    """model.init_from's weights, set up as model_cfg (a ModelConfig) says, for data in tokenizer."""
    model, trained_with = load_pretrained(
        model_cfg.init_from, block_size=model_cfg.block_size, dropout=model_cfg.dropout,
        vocab_multiple=model_cfg.vocab_multiple, gradient_checkpointing=model_cfg.gradient_checkpointing,
    )
    if trained_with != tokenizer:
        raise ConfigError(
            f"model.init_from={model_cfg.init_from} was trained with tokenizer {trained_with.get('kind')}, "
            f"but the dataset uses {tokenizer.get('kind')}; pick a dataset with the same tokenizer "
            "(e.g. dataset=shakespeare for GPT-2)")
    return model


# The Python face -------------------------------------------------------------------------------


class LanguageModel:
    """A GPT with its tokenizer: text in, text out. Made by nanogpt.load().

    ``python -m nanogpt.sample`` prints exactly what stream() yields, so
    generate() with the same settings returns the same text as the command.
    """

    def __init__(self, loaded: LoadedSource, device: torch.device, dtype: torch.dtype,
                 quantize: str | None = None):
        self.model = quantize_model(loaded.model.to(device).eval(), quantize, device)
        self.tokenizer = loaded.tokenizer
        self.encode, self.decode = tokenizer_codec(loaded.tokenizer)
        self.device, self.dtype = device, dtype
        self.source = loaded

    def __repr__(self) -> str:
        c = self.model.config
        return (f"LanguageModel({self.source.where!r}: {c.n_layer} layers, {c.n_head} heads, "
                f"{c.n_embd} wide, block {c.block_size}, {self.tokenizer['kind']} vocabulary, {self.device})")

    def generate(self, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8,
                 top_k: int | None = 200, top_p: float | None = None, seed: int = 1337,
                 use_cache: bool = True) -> str:
        """The prompt followed by max_new_tokens generated tokens, decoded.

        The defaults are nanogpt.sample's; temperature=0 (or top_k=1) is greedy.
        """
        new = self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed=seed, use_cache=use_cache)
        return prompt + "".join(new)

    def stream(self, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8,
               top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
               use_cache: bool = True, generator: torch.Generator | None = None) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are sampled (not repeating the prompt).

        Everything so far is decoded at each token and only what is new is
        yielded, so a character made of several BPE tokens appears once it is
        whole. generator, if given, is used instead of a fresh one seeded with seed.
        """
        if not prompt:
            raise ConfigError("the prompt is empty; the model needs at least one token to continue")
        try:
            prompt_ids = self.encode(prompt)
        except UnknownTokenError as e:
            raise DataError(f"prompt: {e} of {self.source.where}") from None
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        ids: list[int] = []
        shown = ""
        with autocast(self.device, self.dtype):
            for token in self.model.stream(idx, max_new_tokens, temperature, top_k, top_p,
                                           use_cache=use_cache, generator=generator):
                ids.append(int(token))
                text = self.decode(ids)
                yield text[len(shown):]
                shown = text


def load(source: str | Path, device: str = "auto", dtype: str = "auto",
         meta: str | Path | None = None, quantize: str | None = None) -> LanguageModel:
    """A model ready to generate text, from any source nanogpt knows (see ACCEPTED).

    device is auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps; dtype
    auto (bfloat16 or float16 on CUDA, else float32), float32, bfloat16 or
    float16. meta points at a karpathy/nanoGPT meta.pkl that is not where
    nanoGPT's own sample.py would find it. quantize="int8" stores the Linear
    weights as int8 for faster generation on a CPU (nanogpt/quantize.py).
    """
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize={quantize!r} is not one of {', '.join(map(repr, QUANTIZATIONS))}")
    torch_device = resolve_device(device)
    loaded = resolve_source(source, key="source", meta=meta)
    return LanguageModel(loaded, torch_device, resolve_dtype(dtype, torch_device), quantize)
