"""quantize=int8: weight-only int8 Linear layers for generation, checked against plain float arithmetic."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import nanogpt
from nanogpt.dataset.pipeline import prepare_data
from nanogpt.errors import ConfigError
from nanogpt.model import GPT, GPTConfig
from nanogpt.weights.quantize import Int8Linear, quantize_model

from .commands import run_in_process
from .test_eval import last_json
from .test_load import REPO, char_run, write_our_checkpoint  # noqa: F401  (char_run is a fixture)


def test_int8_linear_computes_the_product_of_its_rounded_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    quantized = Int8Linear(linear)
    weight = linear.weight.detach().double()
    scale = weight.abs().amax(dim=1) / 127
    codes = torch.round(weight / scale[:, None])
    assert quantized.weight.dtype == torch.int8 and torch.equal(quantized.weight.double(), codes)

    x = torch.randn(3, 5, 64)
    # The layer multiplies bfloat16 activations by the codes times their (bfloat16) row scales.
    dequantized = codes * quantized.scale.double()[:, None]
    expected = x.to(torch.bfloat16).double() @ dequantized.T + linear.bias.double()
    got = quantized(x)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 40)
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)  # bfloat16 output
    error = ((got - linear(x)).norm() / linear(x).norm()).item()
    assert 0 < error < 0.02, error  # rounding to 1/127 of each row's largest weight


def test_load_with_int8_quantizes_every_linear_and_keeps_the_logits(char_run):  # noqa: F811
    run_dir, _ = char_run
    exact = nanogpt.load(run_dir, device="cpu")
    quantized = nanogpt.load(run_dir, device="cpu", quantize="int8")
    assert not any(isinstance(m, nn.Linear) for m in quantized.model.modules())
    assert sum(isinstance(m, Int8Linear) for m in quantized.model.modules()) == 2 * 4 + 1  # blocks + head
    idx = torch.tensor([exact.encode("ROMEO: But soft, what light")])
    with torch.no_grad():
        reference, _ = exact.model(idx, targets=idx)  # all positions
        logits, _ = quantized.model(idx, targets=idx)
    difference = ((logits - reference).norm() / reference.norm()).item()
    assert 0 < difference < 0.03, difference
    # The command prints what the Python face generates with the same settings.
    text = quantized.generate("ROMEO:", max_new_tokens=40, temperature=0.8, top_k=10, seed=5)
    result = run_in_process("nanogpt.sample", f"ckpt={run_dir}", "prompt=ROMEO:", "device=cpu",
                            "quantize=int8", "num_tokens=40", "top_k=10", "seed=5", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"


def test_eval_measures_what_int8_costs(tmp_path, corpus, data_root):
    data = prepare_data("toy", str(corpus), data_root)
    config = GPTConfig(vocab_size=data.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    dataset = {"name": "toy", "source": str(corpus), "tokenizer": "char", "val_fraction": 0.1}
    write_our_checkpoint(tmp_path / "run" / "best.pt", config, data.meta["tokenizer"],
                         {"dataset": dataset, "data_root": str(data_root)})
    losses = {}
    for how in ("null", "int8"):
        result = run_in_process("nanogpt.eval", "ckpt=run", "device=cpu", f"quantize={how}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        losses[how] = last_json(result.stdout)["loss"]
    print(f"val loss: float32 {losses['null']:.5f}, int8 {losses['int8']:.5f}")
    assert losses["int8"] != losses["null"]
    assert losses["int8"] == pytest.approx(losses["null"], rel=0.01)


def test_int8_refuses_widths_its_kernel_cannot_take_and_other_devices():
    with pytest.raises(ConfigError, match="multiples of 16.*24-wide input"):
        quantize_model(GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=24)), "int8",
                       torch.device("cpu"))
    model = GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ConfigError, match="CPU only"):
        quantize_model(model, "int8", torch.device("cuda"))
    assert all(not isinstance(m, Int8Linear) for m in model.modules())  # refused before any change
    with pytest.raises(ConfigError, match="quantize='int4' is not one of None, 'int8'"):
        nanogpt.load("gpt2", device="cpu", quantize="int4")


def test_unknown_quantization_on_the_command_line_is_one_line(char_run):  # noqa: F811
    run_dir, _ = char_run
    result = run_in_process("nanogpt.sample", f"ckpt={run_dir}", "quantize=int4", cwd=run_dir.parent)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "quantize='int4' is not one of null, int8" in result.stderr


def test_docs_quantize_snippet_runs(char_run, monkeypatch):  # noqa: F811
    run_dir, _ = char_run
    page = REPO / "docs" / "sampling.md"
    section = page.read_text().split("## Faster sampling on a CPU", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'quantize="int8"' in code and "outputs/2026-11-22/10-31-07" in code
    namespace = {"nanogpt": nanogpt}
    exec(compile(code.replace("outputs/2026-11-22/10-31-07", str(run_dir)), str(page), "exec"), namespace)
    assert isinstance(namespace["lm"].model.lm_head, Int8Linear)
