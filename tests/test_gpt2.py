"""GPT-2 presets, vocabulary padding, Hugging Face import/export and gradient checkpointing."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from nanogpt.cli.paths import CONFIG_DIR
from nanogpt.model import GPT, GPTConfig
from nanogpt.weights.checkpoint import save_checkpoint
from nanogpt.weights.loading import load_pretrained as load_gpt2_weights
from tests.commands import run_in_process
from tests.conftest import TINY_RUN, register_commands, run_module

# Parameters of OpenAI's releases (embeddings tied, 50257 tokens, 1024 positions).
PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
             "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def composed_model(preset: str) -> dict:
    """The model group of conf/train.yaml as Hydra composes it with model=preset."""
    register_commands()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}"])
    return {k: v for k, v in cfg.model.items() if k not in ("init_from", "vocab_size")}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_presets_have_the_published_parameter_counts(preset):
    shape = composed_model(preset)
    with torch.device("meta"):
        exact = GPT(GPTConfig(vocab_size=50257, **{**shape, "vocab_multiple": 1}))
        padded = GPT(GPTConfig(vocab_size=50257, **shape))
    assert exact.num_params(non_embedding=False) == PUBLISHED[preset]
    assert padded.config.padded_vocab_size == 50304
    assert padded.num_params(non_embedding=False) == PUBLISHED[preset] + 47 * shape["n_embd"]


def test_padded_vocabulary_changes_neither_logits_nor_loss():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    plain, padded = GPT(config).eval(), GPT(replace(config, vocab_multiple=64)).eval()
    state = plain.state_dict()
    padded_state = padded.state_dict()
    for key, value in state.items():
        padded_state[key][: value.shape[0]].copy_(value)
    padded.load_state_dict(padded_state)
    assert padded.lm_head.weight.shape[0] == 128
    idx = torch.randint(0, 101, (4, 16))
    logits_a, loss_a = plain(idx, idx)
    logits_b, loss_b = padded(idx, idx)
    assert logits_b.shape[-1] == 101
    torch.testing.assert_close(logits_b, logits_a)
    torch.testing.assert_close(loss_b, loss_a)
    # Even when the padded rows would win, they cannot be sampled.
    with torch.no_grad():
        padded.lm_head.weight[101:] = 10.0
    tokens = list(padded.stream(idx[:, :2], 20, temperature=1.0))
    assert max(int(t.max()) for t in tokens) < 101


def random_hf_model(path, activation="gelu_new", vocab_size=101, n_positions=64, n_embd=48, n_layer=3,
                    n_head=4, std=0.15, **config):
    """A small GPT2LMHeadModel with weights large enough for every layer to matter, saved to path
    (no weights can be downloaded here); config: more of GPT2Config's settings.
    """
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, activation_function=activation, bos_token_id=None,
                        eos_token_id=None, **config)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # LayerNorm gains around 1, everything else clearly non-zero.
            param.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, std)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_hf_import_logits_match_transformers(tmp_path, activation):
    reference = random_hf_model(tmp_path / "hf", activation)
    ours, tokenizer = load_gpt2_weights(str(tmp_path / "hf"), block_size=32, vocab_multiple=64)
    ours.eval()
    assert ours.config.block_size == 32 and ours.transformer.wpe.weight.shape[0] == 32
    assert tokenizer.description == {"kind": "tiktoken", "encoding": "gpt2"}
    idx = torch.randint(0, 101, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
        logits, _ = ours(idx, idx)
    difference = (logits - expected).abs().max().item()
    print(f"HF import ({activation}): max |logit difference| = {difference:.3g}, "
          f"logit scale {expected.abs().max().item():.3g}")
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert difference < 1e-4


def test_hf_import_dropout_override_and_block_size_limit(tmp_path):
    random_hf_model(tmp_path / "hf")
    model, _ = load_gpt2_weights(str(tmp_path / "hf"), dropout=0.2)
    assert model.config.dropout == 0.2 and model.config.block_size == 64
    assert model.transformer.h[0].attn.resid_dropout.p == 0.2
    with pytest.raises(Exception, match="model.block_size=128 is longer than the 64 positions"):
        load_gpt2_weights(str(tmp_path / "hf"), block_size=128)


def train_checkpoint(path, config: GPTConfig, tokenizer: dict) -> GPT:
    """Save a randomly initialised model as one of our checkpoints."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_checkpoint(path, {"model_config": asdict(config), "model": model.state_dict(),
                           "tokenizer": tokenizer, "iter_num": 0, "best_val_loss": 1.0, "config": {}})
    return model


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_export_char_model_loads_in_transformers_with_equal_logits(tmp_path):
    vocabulary = [chr(c) for c in range(32, 97)]
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                       bias=False, vocab_multiple=64)
    ours = train_checkpoint(tmp_path / "best.pt", config, {"kind": "char", "vocabulary": vocabulary})
    result = run_module("nanogpt.export", f"ckpt={tmp_path}", "out=hf_out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "matches no Hugging Face tokenizer" in result.stdout
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()
    idx = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        expected, _ = ours(idx, idx)
        difference = (exported(idx).logits - expected).abs().max().item()
    print(f"export (char, no bias): max |logit difference| = {difference:.3g}")
    assert difference < 1e-4
    stored = json.loads((tmp_path / "hf_out" / "nanogpt_tokenizer.json").read_text())
    assert stored["vocabulary"] == vocabulary
    # And back: init_from the exported directory gives the same model.
    again, tokenizer = load_gpt2_weights(str(tmp_path / "hf_out"))
    assert tokenizer.description == stored
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(idx, idx)[0], expected, atol=1e-5, rtol=0)


def test_export_refuses_an_architecture_variant(tmp_path):
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0,
                       position_encoding="rope", activation="relu2")
    vocabulary = [chr(c) for c in range(65)]
    train_checkpoint(tmp_path / "best.pt", config, {"kind": "char", "vocabulary": vocabulary})
    result = run_in_process("nanogpt.export", f"ckpt={tmp_path}", "out=hf_out", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.position_encoding=rope model.activation=relu2" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "hf_out").exists()


def test_export_bpe_model_carries_gpt2_tokenizer(tmp_path, bpe_cache):
    import tiktoken

    config = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                       vocab_multiple=64, gelu_approximate="tanh")
    ours = train_checkpoint(tmp_path / "last.pt", config, {"kind": "tiktoken", "encoding": "gpt2"})
    result = run_in_process("nanogpt.export", f"ckpt={tmp_path / 'last.pt'}", "out=hf_out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()
    assert json.loads((tmp_path / "hf_out" / "config.json").read_text())["activation_function"] == "gelu_new"
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf_out")(text)["input_ids"]
    assert ids == tiktoken.get_encoding("gpt2").encode_ordinary(text)
    idx = torch.tensor([ids[:16]])
    with torch.no_grad():
        difference = (exported(idx).logits - ours(idx, idx)[0]).abs().max().item()
    assert difference < 1e-4


def test_export_of_a_missing_checkpoint_is_one_error_line(tmp_path):
    result = run_in_process("nanogpt.export", "ckpt=nowhere", "out=x", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ckpt=nowhere does not exist and is no known model")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_finetune_from_a_local_hf_directory(tmp_path, shakespeare, data_root, bpe_cache):
    random_hf_model(tmp_path / "hf", vocab_size=50257)
    result = run_in_process(
        "nanogpt.train", *TINY_RUN, "dataset=shakespeare", f"dataset.source={shakespeare}",
        f"data_root={data_root}", f"model.init_from={tmp_path / 'hf'}", "model.block_size=16",
        "model.dropout=0.1", "max_iters=2", "eval_interval=2", "optimizer.warmup_iters=0",
        "hydra.run.dir=run", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"initialised from {tmp_path / 'hf'}" in result.stdout
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["model_config"]["n_embd"] == 48 and state["model_config"]["block_size"] == 16
    assert state["model_config"]["dropout"] == 0.1


def test_init_from_with_a_different_tokenizer_is_one_error_line(tmp_path, corpus, data_root):
    random_hf_model(tmp_path / "hf")
    result = run_in_process(
        "nanogpt.train", *TINY_RUN, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}",
        f"model.init_from={tmp_path / 'hf'}", "hydra.run.dir=run", cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.init_from=")
    assert "tokenizer" in lines[0]
    assert not (tmp_path / "run").exists()


def test_init_from_an_unknown_name_is_one_error_line(tmp_path, corpus, data_root):
    result = run_in_process(
        "nanogpt.train", *TINY_RUN, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}",
        "model.init_from=gpt3", cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: model.init_from=gpt3 does not exist and is no known model name; model.init_from= takes "
        "a run directory or .pt file of ours, karpathy/nanoGPT's out_dir or ckpt.pt")
    assert lines[0].endswith("gpt2, gpt2-medium, gpt2-large, gpt2-xl")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=dropout)
    torch.manual_seed(0)
    plain = GPT(config)
    checkpointed = GPT(replace(config, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50, (4, 16))
    gradients = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks; checkpointing replays them in backward
        _, loss = model(idx, idx)
        loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
