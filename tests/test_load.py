"""nanogpt.load and the one source resolver behind load, sample, eval, export and init_from."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nanogpt
from nanogpt.errors import CheckpointError
from nanogpt.model import GPT, GPTConfig
from nanogpt.text.nanogpt_meta import read_nanogpt_meta_pkl
from nanogpt.weights.checkpoint import save_checkpoint
from nanogpt.weights.loading import load_pretrained, resolve_source

from .commands import run_in_process
from .conftest import REPO, run_module

VOCABULARY = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))  # 65
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def random_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT with weights large enough that every layer changes the logits."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def write_our_checkpoint(path: Path, config: GPTConfig, tokenizer: dict, run_config: dict | None = None):
    model = random_gpt(config)
    save_checkpoint(path, {"model_config": asdict(config), "model": model.state_dict(),
                           "tokenizer": tokenizer, "iter_num": 0, "best_val_loss": 1.0,
                           "config": run_config or {}})
    return model


def write_nanogpt_checkpoint(out_dir: Path, vocab_size: int = 65, bias: bool = True, block_size: int = 32,
                             dataset: str = "shakespeare_char", compiled: bool = True) -> dict:
    """A ckpt.pt in karpathy/nanoGPT's format; returns the plain weights.

    Its keys, its parameter names, torch.compile's prefix and the causal-mask
    buffers older nanoGPT versions save.
    """
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=block_size, bias=bias, vocab_size=vocab_size,
                dropout=0.0)
    model = random_gpt(GPTConfig(**args))
    weights = model.state_dict()
    saved = dict(weights)
    for layer in range(args["n_layer"]):
        saved[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(
            1, 1, block_size, block_size)
    prefix = "_orig_mod." if compiled else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": {prefix + name: value for name, value in saved.items()},
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "model_args": args, "iter_num": 100, "best_val_loss": torch.tensor(1.5),
        "config": {"dataset": dataset, "out_dir": str(out_dir), "batch_size": 12, "compile": compiled},
    }, out_dir / "ckpt.pt")
    return weights


def write_meta_pkl(directory: Path, vocabulary=VOCABULARY) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": len(vocabulary), "itos": dict(enumerate(vocabulary)),
            "stoi": {ch: i for i, ch in enumerate(vocabulary)}}
    with open(directory / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return directory / "meta.pkl"


def transformers_model(weights: dict, config: GPTConfig) -> GPT2LMHeadModel:
    """The same weights in Hugging Face's GPT-2, mapped here by hand: an independent implementation."""
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    state = {name: value.t() if name.endswith(CONV1D) else value for name, value in weights.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith((".attn.bias", ".attn.masked_bias")) for name in missing)
    return hf


def greedy_with_transformers(hf: GPT2LMHeadModel, ids: list[int], new_tokens: int, block_size: int):
    """The generation loop of nanoGPT with top_k=1: crop to the last block_size tokens, take the likeliest."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = hf(torch.tensor([ids[-block_size:]])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids


@pytest.fixture
def char_run(tmp_path) -> tuple[Path, GPT]:
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    tokenizer = {"kind": "char", "vocabulary": VOCABULARY}
    model = write_our_checkpoint(tmp_path / "run" / "best.pt", config, tokenizer)
    return tmp_path / "run", model


def test_import_nanogpt_exposes_the_python_face_without_hydra():
    # Nor any entry-point module: runpy warns on stderr when `python -m nanogpt.data` finds
    # nanogpt.data already imported by the package.
    code = ("import nanogpt, sys; assert 'nanogpt.dataset.pipeline' not in sys.modules; "
            "print(nanogpt.GPT.__name__, nanogpt.GPTConfig.__name__, nanogpt.load.__name__); "
            "assert 'hydra' not in sys.modules, 'hydra imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["GPT", "GPTConfig", "load"]


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=60, temperature=0.8, top_k=10, seed=3),
    dict(max_new_tokens=40, temperature=1.0, top_k=None, top_p=0.9, seed=7),
    dict(max_new_tokens=50, temperature=0.0),
])
def test_generate_returns_what_the_sample_command_prints(char_run, settings):
    run_dir, _ = char_run
    lm = nanogpt.load(run_dir, device="cpu")
    assert not lm.model.training
    text = lm.generate("ROMEO:", **settings)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + settings["max_new_tokens"]
    names = {"max_new_tokens": "num_tokens"}
    args = [f"{names.get(k, k)}={'null' if v is None else v}" for k, v in settings.items()]
    result = run_in_process("nanogpt.sample", f"ckpt={run_dir}", "prompt=ROMEO:", "device=cpu", *args,
                            cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"


def test_encode_decode_and_the_tensor_generate(char_run):
    run_dir, model = char_run
    lm = nanogpt.load(str(run_dir / "best.pt"), device="cpu")
    ids = lm.encode("ROMEO:")
    assert lm.decode(ids) == "ROMEO:" and ids == [VOCABULARY.index(c) for c in "ROMEO:"]
    out = lm.model.generate(torch.tensor([ids]), 10, temperature=0.0)
    assert out.shape == (1, 16) and out[0, :6].tolist() == ids
    assert lm.generate("ROMEO:", max_new_tokens=10, temperature=0.0) == lm.decode(out[0].tolist())


def test_sampling_says_which_iteration_it_reads_and_warns_of_an_untrained_model(char_run):
    """A run stopped before its first step leaves an untrained checkpoint: sampling says so, on stderr."""
    run_dir, _ = char_run  # written at iteration 0
    result = run_in_process("nanogpt.sample", f"ckpt={run_dir}", "num_tokens=5", "device=cpu",
                            cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    assert f"{run_dir / 'best.pt'}: iteration 0" in result.stderr
    assert "untrained" in result.stderr and "untrained" not in result.stdout
    assert result.stdout == nanogpt.load(run_dir, device="cpu").generate("\n", max_new_tokens=5) + "\n"


def test_chat_warns_once_when_the_model_was_never_finetuned(char_run):
    lm = nanogpt.load(char_run[0], device="cpu")
    with pytest.warns(UserWarning, match="was not finetuned on instruction data") as warned:
        lm.chat("Hello", max_new_tokens=3)
        lm.chat("Again", max_new_tokens=3)
    assert len(warned) == 1


def test_readme_python_section_runs(char_run, monkeypatch):
    run_dir, _ = char_run
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'nanogpt.load("outputs/2026-11-22/10-31-07")' in code
    code = code.replace("outputs/2026-11-22/10-31-07", str(run_dir))
    monkeypatch.chdir(run_dir.parent)
    exec(compile(code, "README.md", "exec"), {})


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_nanogpt_checkpoint_greedy_text_equals_an_independent_greedy_decode(tmp_path, monkeypatch):
    """Greedy (top_k=1, as nanoGPT's sample.py --top_k=1) from nanoGPT's ckpt.pt, against transformers."""
    weights = write_nanogpt_checkpoint(tmp_path / "out-shakespeare-char", bias=True)
    write_meta_pkl(tmp_path / "data" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)  # nanoGPT's sample.py finds data/<dataset>/meta.pkl from here
    lm = nanogpt.load("out-shakespeare-char", device="cpu")
    assert lm.source.kind == "nanoGPT"
    assert lm.tokenizer.description == {"kind": "char", "vocabulary": VOCABULARY}
    hf = transformers_model(weights, lm.model.config)
    prompt = "ROMEO:"
    ids = [VOCABULARY.index(c) for c in prompt]
    # Within the block both generation paths equal nanoGPT's loop; past it, use_cache=False does.
    expected = "".join(VOCABULARY[i] for i in greedy_with_transformers(hf, ids, 26, 32))
    assert lm.generate(prompt, max_new_tokens=26, top_k=1, temperature=1.0) == expected
    expected = "".join(VOCABULARY[i] for i in greedy_with_transformers(hf, ids, 80, 32))
    assert lm.generate(prompt, max_new_tokens=80, top_k=1, temperature=1.0, use_cache=False) == expected
    assert len(set(expected[6:])) > 3  # a text, not one character repeated
    # The sample command reads the same checkpoint the same way.
    result = run_in_process("nanogpt.sample", "ckpt=out-shakespeare-char/ckpt.pt", "prompt=ROMEO:",
                            "num_tokens=80", "top_k=1", "temperature=1.0", "use_cache=false", "device=cpu",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_nanogpt_checkpoint_meta_given_explicitly_and_bias_free(tmp_path):
    write_nanogpt_checkpoint(tmp_path / "out", bias=False, compiled=False)
    meta = write_meta_pkl(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"no meta.pkl was found \(looked in .*data/shakespeare_char/"
                                              r"meta.pkl.*\); .*give meta=PATH"):
        resolve_source(tmp_path / "out")
    for given in (meta, meta.parent):
        lm = nanogpt.load(tmp_path / "out", device="cpu", meta=given)
        assert lm.tokenizer.description["vocabulary"] == VOCABULARY and not lm.model.config.bias


def test_checking_a_checkpoints_shapes_initialises_nothing_and_imports_no_compiler(tmp_path):
    """The GPT a nanoGPT checkpoint or a Hugging Face directory is checked against is built on the
    meta device without its initialisers, whose first call there imports torch._dynamo (a second
    of every sample's start-up); a fresh process shows whether anything imported it.
    """
    write_nanogpt_checkpoint(tmp_path / "out", bias=False, compiled=False)
    meta = write_meta_pkl(tmp_path / "elsewhere")
    code = ("import sys, nanogpt\n"
            "from nanogpt.model import GPTConfig\n"
            "from nanogpt.weights.huggingface import model_state_names\n"
            "lm = nanogpt.load(sys.argv[1], device='cpu', meta=sys.argv[2])\n"
            "print(len(model_state_names(GPTConfig(n_layer=2))), lm.generate('RO', max_new_tokens=3) != '',\n"
            "      'torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(meta)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(GPT(GPTConfig(n_layer=2)).state_dict())), "True", "False"]


def test_nanogpt_checkpoint_with_gpt2_sized_vocabulary_uses_gpt2_bpe(tmp_path, bpe_cache):
    write_nanogpt_checkpoint(tmp_path / "out", vocab_size=50304, dataset="openwebtext")
    lm = nanogpt.load(tmp_path / "out", device="cpu")
    assert lm.tokenizer.description == {"kind": "tiktoken", "encoding": "gpt2"}
    assert lm.encode("Hello world") == [15496, 995]


def test_malicious_meta_pkl_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    write_nanogpt_checkpoint(tmp_path / "out")
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "meta.pkl").write_bytes(
        pickle.dumps({"vocab_size": 65, "itos": Payload()}))
    with pytest.raises(CheckpointError, match="nothing in it was run: it refers to (posix|os).system"):
        read_nanogpt_meta_pkl(tmp_path / "data" / "shakespeare_char" / "meta.pkl")
    for entry in ("sample", "eval"):
        result = run_in_process(f"nanogpt.{entry}", "ckpt=out", cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "meta.pkl was refused, nothing in it was run" in lines[0], result.stderr
    assert not marker.exists()
    # The same pickle does run code when unpickled the ordinary way: the test is not vacuous.
    pickle.loads((tmp_path / "data" / "shakespeare_char" / "meta.pkl").read_bytes())
    assert marker.exists()


def test_nanogpt_checkpoint_without_meta_is_one_line(tmp_path):
    write_nanogpt_checkpoint(tmp_path / "out")
    result = run_in_process("nanogpt.sample", "ckpt=out", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: ") and "65-token vocabulary" in lines[0]
    assert str(tmp_path / "data" / "shakespeare_char" / "meta.pkl") in lines[0] and "meta=PATH" in lines[0]


@pytest.mark.parametrize("entry", ["sample", "eval", "export"])
def test_unknown_source_is_one_line_listing_what_ckpt_takes(tmp_path, entry):
    out = ["out=x"] if entry == "export" else []
    result = run_in_process(f"nanogpt.{entry}", "ckpt=gpt3", *out, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: ckpt=gpt3 does not exist and is no known model name; ckpt= takes a run directory or .pt "
        "file of ours, karpathy/nanoGPT's out_dir or ckpt.pt, a Hugging Face GPT-2 directory "
        "(save_pretrained, nanogpt.export), or one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"
    ]


def test_gpt2_by_name_offline_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = run_module("nanogpt.sample", "ckpt=gpt2", cwd=tmp_path, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ckpt=gpt2: could not download openai-community/gpt2")
    assert "offline, give ckpt= a local directory" in lines[0]


def test_hugging_face_directory_loads_with_its_logits(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    reference = GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    lm = nanogpt.load(tmp_path / "hf", device="cpu")
    idx = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(idx, idx)[0], reference(idx).logits, atol=1e-5, rtol=0)


def test_init_from_takes_our_runs_and_nanogpt_checkpoints(char_run, tmp_path, monkeypatch):
    """model.init_from goes through the same resolver: crop positions, pad the vocabulary, keep the logits."""
    run_dir, ours = char_run
    weights = write_nanogpt_checkpoint(tmp_path / "nano")
    write_meta_pkl(tmp_path / "data" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)
    nano = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.0)).eval()
    nano.load_state_dict(weights)
    idx = torch.randint(0, 65, (2, 16))
    for source, reference in ((str(run_dir), ours), ("nano", nano)):
        model, tokenizer = load_pretrained(source, block_size=16, dropout=0.1, vocab_multiple=64)
        assert tokenizer.description == {"kind": "char", "vocabulary": VOCABULARY}
        assert model.config.block_size == 16 and model.config.padded_vocab_size == 128
        assert model.config.dropout == 0.1
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(idx, idx)[0], reference(idx, idx)[0])
