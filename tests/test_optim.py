import torch

from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import configure_muon


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = small_model()
    opt = configure_muon(model, 1e-3, 0.02, 0.1, (0.9, 0.95))
    muon_params = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        in_block_matrix = p.dim() == 2 and name.startswith("transformer.h.")
        assert (id(p) in muon_params) == in_block_matrix, name
    adamw_count = sum(len(g["params"]) for g in opt.adamw.param_groups)
    assert len(muon_params) + adamw_count == len(list(model.parameters()))
    assert opt.muon.param_groups[0]["lr_scale"] == 20.0


def test_muon_learns_and_its_state_round_trips():
    model = small_model()
    opt = configure_muon(model, 3e-3, 0.02, 0.0, (0.9, 0.95))
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
    fresh = configure_muon(small_model(), 3e-3, 0.02, 0.0, (0.9, 0.95))
    fresh.load_state_dict(state)
    assert fresh.state_dict()["muon"]["state"].keys() == state["muon"]["state"].keys()
