import pytest
import torch

from nanogpt.errors import ConfigError
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime.device import bf16_instructions
from nanogpt.training.optim import (
    Muon,
    OptimizerConfig,
    build_muon,
    build_optimizer,
    newton_schulz_dtype,
    orthogonalize,
)


def muon(lr: float, weight_decay: float) -> OptimizerConfig:
    return OptimizerConfig(name="muon", lr=lr, min_lr=0.0, muon_lr=0.02, weight_decay=weight_decay)


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = small_model()
    opt = build_muon(model, muon(lr=1e-3, weight_decay=0.1))
    muon_params = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        in_block_matrix = p.dim() == 2 and name.startswith("transformer.h.")
        assert (id(p) in muon_params) == in_block_matrix, name
    adamw_count = sum(len(g["params"]) for g in opt.adamw.param_groups)
    assert len(muon_params) + adamw_count == len(list(model.parameters()))
    assert opt.muon.param_groups[0]["lr_scale"] == 20.0


def test_muon_learns_and_its_state_round_trips():
    model = small_model()
    opt = build_muon(model, muon(lr=3e-3, weight_decay=0.0))
    x = torch.randint(0, 16, (8, 16))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(30):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.0
    state = opt.state_dict()
    fresh = build_muon(small_model(), muon(lr=3e-3, weight_decay=0.0))
    fresh.load_state_dict(state)
    assert fresh.state_dict()["muon"]["state"].keys() == state["muon"]["state"].keys()


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_muon_in_bfloat16_is_torchs_muon():
    """With ns_dtype=bfloat16 our Muon takes exactly torch.optim.Muon's steps."""
    ours, theirs = small_model(), small_model()
    matrices = [[p for p in m.parameters() if p.dim() == 2] for m in (ours, theirs)]
    opt_ours = Muon(matrices[0], ns_dtype=torch.bfloat16, lr=0.02, weight_decay=0.1)
    opt_theirs = torch.optim.Muon(matrices[1], lr=0.02, weight_decay=0.1)
    x = torch.randint(0, 16, (8, 16))
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            model(x, torch.roll(x, -1, dims=1))[1].backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_orthogonalisation_flattens_the_spectrum_in_either_precision(dtype):
    """The default precision follows the hardware; either one brings every singular value near 1."""
    model = small_model()
    opt = Muon([model.lm_head.weight], lr=0.02)
    assert opt.ns_dtype is None  # None: newton_schulz_dtype() picks at each step
    expected = torch.bfloat16 if bf16_instructions() else torch.float32
    assert newton_schulz_dtype(torch.device("cpu")) == expected
    assert newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16
    torch.manual_seed(0)
    skewed = torch.randn(48, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # spread-out singular values
    out = orthogonalize(skewed, (3.4445, -4.775, 2.0315), 5, 1e-7, dtype)
    assert out.dtype == dtype and out.shape == skewed.shape
    singular = torch.linalg.svdvals(out.float())
    assert singular.min() > 0.3 and singular.max() < 1.3
    assert torch.linalg.svdvals(skewed).max() / torch.linalg.svdvals(skewed).min() > 50


def test_a_stack_is_orthogonalised_like_its_matrices_one_by_one():
    torch.manual_seed(0)
    for shape in ((3, 20, 12), (3, 12, 20)):
        stack = torch.randn(*shape)
        together = orthogonalize(stack, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
        for matrix, result in zip(stack, together, strict=True):
            alone = orthogonalize(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
            torch.testing.assert_close(result, alone, rtol=1e-5, atol=1e-5)


def test_muon_stands_alone_and_refuses_what_torchs_refuses():
    """Our Muon is a plain torch Optimizer: it must not depend on torch.optim.Muon existing."""
    assert Muon.__mro__[1] is torch.optim.Optimizer
    model = small_model()
    opt = Muon([model.lm_head.weight], lr=0.02)
    assert opt.param_groups[0]["ns_steps"] == 5 and opt.param_groups[0]["nesterov"] is True
    with pytest.raises(ValueError, match="matrices only"):
        Muon([model.transformer.ln_f.weight])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([model.lm_head.weight], adjust_lr_fn="huge")


def test_muon_ns_steps_reaches_the_iteration_and_changes_the_update():
    updates = {}
    for steps in (2, 5):
        torch.manual_seed(0)  # the same model and batch for both
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10))
        torch.manual_seed(1)
        optimizer = build_optimizer(model, OptimizerConfig(name="muon", muon_ns_steps=steps))
        assert optimizer.muon.param_groups[0]["ns_steps"] == steps
        idx = torch.randint(0, 10, (2, 8))
        before = model.transformer.h[0].mlp.c_fc.weight.clone()
        model(idx, idx)[1].backward()
        optimizer.step()
        updates[steps] = model.transformer.h[0].mlp.c_fc.weight - before
    assert not torch.allclose(updates[2], updates[5])
    with pytest.raises(ConfigError, match="muon_ns_steps=0"):
        OptimizerConfig(name="muon", muon_ns_steps=0)
