import dataclasses
import math

import pytest
import torch

from nanogpt.errors import ConfigError
from nanogpt.model import GPT, GPTConfig, attention, rotary_angles, rotate, sample_next_token
from nanogpt.training.optim import OptimizerConfig, build_adamw


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPTConfig(**{**base, **overrides})


# GPT-2 itself, then each architecture variant alone, then all of them together.
VARIANTS = [
    {},
    {"position_encoding": "rope"},
    {"norm": "rmsnorm"},
    {"qk_norm": True},
    {"activation": "relu2"},
    {"position_encoding": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2"},
]
VARIANT_IDS = ["gpt2", "rope", "rmsnorm", "qk_norm", "relu2", "all"]


def test_logits_and_loss_shapes():
    model = GPT(tiny_config())
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 11)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 11) and loss is None


def test_initial_loss_is_near_uniform():
    model = GPT(tiny_config(vocab_size=65, n_embd=32))
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 65, (2, 8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.2


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_causality_later_tokens_never_change_earlier_logits(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**variant)).eval()
    idx = torch.randint(0, 11, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 11
    full_a, _ = model(idx, idx)
    full_b, _ = model(changed, changed)
    assert torch.allclose(full_a[0, :8], full_b[0, :8], atol=1e-6)
    assert not torch.allclose(full_a[0, 8:], full_b[0, 8:])


def test_weight_tying_shares_one_tensor():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_parameter_counts():
    # The default small model on 65 characters: about 10.7M parameters.
    small = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384))
    assert 10.6e6 < small.num_params() < 10.8e6
    # Exact count for a tiny shape: 12 n^2 + 13 n per block (with biases), embeddings, ln_f.
    cfg = tiny_config()
    n, v = cfg.n_embd, cfg.vocab_size
    per_block = 12 * n * n + 13 * n
    expected = cfg.n_layer * per_block + v * n + 2 * n
    assert GPT(cfg).num_params() == expected
    assert GPT(cfg).num_params(non_embedding=False) == expected + cfg.block_size * n


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=64))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_optimizer_decays_only_matrices():
    model = GPT(tiny_config())
    opt = build_adamw(model, OptimizerConfig(weight_decay=0.1, lr=1e-3))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def generate_tokens(model, prompt, n, use_cache, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [int(t) for t in model.stream(prompt, n, temperature=1.0, top_k=5,
                                           use_cache=use_cache, generator=gen)]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_kv_cache_gives_the_same_tokens_as_recomputing(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=32, **variant)).eval()
    prompt = torch.randint(0, 11, (1, 5))
    assert generate_tokens(model, prompt, 27, True) == generate_tokens(model, prompt, 27, False)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_kv_cache_logits_match_full_forward(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**variant)).eval()
    idx = torch.randint(0, 11, (2, 10))
    cache = model.new_cache(2)
    model(idx[:, :6], cache=cache)
    for t in range(6, 10):
        step_logits, _ = model(idx[:, t:t + 1], cache=cache)
        full_logits, _ = model(idx[:, : t + 1])
        assert torch.allclose(step_logits, full_logits, atol=1e-5)


@pytest.mark.parametrize("attention_kind", ["sdpa", "explicit"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_several_tokens_after_a_filled_cache_see_it_and_their_own_past(variant, attention_kind):
    # Scoring reads a shared context into a cache once, then several continuations at once.
    torch.manual_seed(0)
    model = GPT(tiny_config(**variant, attention=attention_kind)).eval()
    idx = torch.randint(0, 11, (2, 12))
    cache = model.new_cache(2)
    model(idx[:, :7], cache=cache)
    hidden = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, output: hidden.append(output))
    model(idx[:, 7:], cache=cache)
    hook.remove()
    full, _ = model(idx, idx)  # every position's logits, without a cache
    torch.testing.assert_close(model.lm_head(hidden[0]), full[:, 7:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_bfloat16_on_the_cpu_warns_of_nothing_and_stays_close_to_float32(variant, recwarn):
    # Under CPU autocast the heads work in float32 (model.py): a norm fed bfloat16 with
    # float32 gains warned of a mismatched dtype and fell back to a slower kernel.
    torch.manual_seed(0)
    model = GPT(tiny_config(**variant))
    idx = torch.randint(0, 11, (2, 16))
    full, loss = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, half_loss = model(idx, idx)
    half_loss.backward()
    assert [str(w.message) for w in recwarn] == []
    assert abs(half_loss.item() - loss.item()) < 0.02
    assert torch.allclose(half.float(), full, atol=0.05)


def test_a_bfloat16_model_generates_with_its_cache_on_the_cpu(recwarn):
    # The cache holds the model's precision; the CPU's attention kernel takes float32.
    torch.manual_seed(0)
    model = GPT(tiny_config(position_encoding="rope", qk_norm=True)).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 11, (1, 3))
    tokens = generate_tokens(model, prompt, 10, True)
    assert len(tokens) == 10 and all(0 <= t < 11 for t in tokens)
    assert [str(w.message) for w in recwarn] == []


def test_generation_continues_past_block_size():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=8)).eval()
    prompt = torch.randint(0, 11, (2, 3))
    for use_cache in (True, False):
        tokens = list(model.stream(prompt, 40, temperature=1.0, use_cache=use_cache))
        assert len(tokens) == 40 and all(t.shape == (2, 1) for t in tokens)


def test_rotary_attention_scores_depend_only_on_distance():
    torch.manual_seed(0)
    config = tiny_config(block_size=32)
    cos, sin = rotary_angles(config)
    q, k = torch.randn(config.head_size), torch.randn(config.head_size)

    def score(query_pos: int, key_pos: int) -> torch.Tensor:
        rotated_q = rotate(q, cos[query_pos], sin[query_pos])
        rotated_k = rotate(k, cos[key_pos], sin[key_pos])
        return rotated_q @ rotated_k

    assert torch.allclose(score(5, 2), score(25, 22), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    assert torch.allclose(rotate(q, cos[0], sin[0]), q)  # position 0 is not turned


def test_variants_change_the_modules():
    default = GPT(tiny_config())
    variant = GPT(tiny_config(position_encoding="rope", norm="rmsnorm", qk_norm=True, activation="relu2"))
    assert default.config.variants == {} and len(variant.config.variants) == 4
    assert "wpe" in default.transformer and "wpe" not in variant.transformer
    assert isinstance(variant.transformer.ln_f, torch.nn.RMSNorm)
    assert isinstance(variant.transformer.h[0].attn.q_norm, torch.nn.RMSNorm)
    hidden = torch.tensor([-2.0, 0.5, 3.0])
    assert variant.transformer.h[0].mlp.activation(hidden).tolist() == [0.0, 0.25, 9.0]
    # The rotary tables are recomputed on construction, never stored in checkpoints.
    assert not any("rope" in key for key in variant.state_dict())


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=VARIANT_IDS[1:])
def test_variants_learn(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**variant))
    optimizer = build_adamw(model, OptimizerConfig(weight_decay=0.0, lr=1e-2))
    idx = torch.randint(0, 11, (4, 16))
    losses = []
    for _ in range(40):
        _, loss = model(idx, torch.roll(idx, -1, dims=1))
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 1.0


def test_forward_rejects_sequences_longer_than_block_size():
    model = GPT(tiny_config(block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, 9), dtype=torch.long))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next_token(logits, temperature=0).item() == 3
    gen = torch.Generator().manual_seed(0)
    drawn = {sample_next_token(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert drawn == {2, 3}
    # probabilities are about .03 .09 .24 .64: top_p=0.8 keeps tokens 3 and 2 only.
    drawn = {sample_next_token(logits, 1.0, top_p=0.8, generator=gen).item() for _ in range(200)}
    assert drawn == {2, 3}
    drawn = {sample_next_token(logits, 1.0, top_p=0.5, generator=gen).item() for _ in range(50)}
    assert drawn == {3}


def test_generate_returns_the_extended_tensor_like_nanogpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompt, 5, temperature=0)
    assert out.shape == (2, 8) and out.dtype == torch.long
    assert torch.equal(out[:, :3], prompt)
    streamed = torch.cat(list(model.stream(prompt, 5, temperature=0)), dim=1)
    assert torch.equal(out[:, 3:], streamed)
    assert len(model.generate(prompt[:1], 4, temperature=0)[0].tolist()) == 7


@pytest.mark.parametrize("bad,message", [
    ({"position_encoding": "rotary"}, "position_encoding='rotary' is not one of learned, rope"),
    ({"n_embd": 10, "n_head": 3}, "n_embd=10 is not divisible by n_head=3"),
    ({"n_head": 0}, "n_head=0 must be at least 1"),
    ({"norm": "batchnorm"}, "norm='batchnorm' is not one of layernorm, rmsnorm"),
    ({"dropout": 1.0}, "dropout=1.0 must be in [0, 1)"),
])
def test_gptconfig_refuses_what_cannot_work_even_from_python(bad, message):
    from nanogpt.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        GPTConfig(**bad)
    assert str(error.value).startswith(message)


def test_zero_init_proj_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=20, dropout=0.0,
                          zero_init_proj=True))
    x = torch.randn(2, 8, 32)
    for block in model.transformer.h:
        assert torch.equal(block.attn.c_proj.weight, torch.zeros_like(block.attn.c_proj.weight))
        torch.testing.assert_close(block(x), x + block.attn.c_proj.bias + block.mlp.c_proj.bias)
    plain = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=20))
    assert plain.transformer.h[0].mlp.c_proj.weight.abs().sum() > 0  # off by default


def test_logit_softcap_bounds_the_logits_smoothly():
    torch.manual_seed(0)
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=20, dropout=0.0)
    capped = GPT(GPTConfig(**shape, logit_softcap=2.0))
    plain = GPT(GPTConfig(**shape))
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        capped.lm_head.weight.mul_(50)  # make raw logits large; shared with wte, so copy both ways
        plain.lm_head.weight.copy_(capped.lm_head.weight)
    idx = torch.randint(0, 20, (2, 8))
    raw, _ = plain(idx, idx)
    logits, loss = capped(idx, idx)
    assert raw.abs().max() > 10 and logits.abs().max() <= 2
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    last, _ = capped(idx)  # generation's path is capped too
    torch.testing.assert_close(last, logits[:, [-1], :])
    assert GPTConfig(logit_softcap=30.0).variants == {"logit_softcap": 30.0}  # GPT-2 export refuses it
    with pytest.raises(ConfigError, match="logit_softcap=-1"):
        GPTConfig(logit_softcap=-1.0)


@pytest.mark.parametrize("queries", [16, 1, 5])
def test_attention_written_out_is_what_the_fused_kernel_computes(queries):
    """softmax(q kᵀ/√d + mask) v against F.scaled_dot_product_attention: the causal
    window, and queries at positions of their own over a cache's keys (one new token, a few).
    """
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, queries, 8), torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if queries == 16:
        torch.testing.assert_close(attention(q, k, v), sdpa(q, k, v, is_causal=True))
    positions = torch.tensor([[3 + i for i in range(queries)], [10 + i for i in range(queries)]])
    seen = (torch.arange(16) <= positions[..., None])[:, None]  # each row's queries at its positions
    mask = torch.zeros(seen.shape).masked_fill(~seen, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, mask), sdpa(q, k, v, attn_mask=seen))


def test_the_model_with_explicit_attention_matches_the_fused_one():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    fused = GPT(config).eval()
    explicit = GPT(dataclasses.replace(config, attention="explicit")).eval()
    explicit.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 40, (3, 16))
    torch.testing.assert_close(explicit(idx, idx)[0], fused(idx, idx)[0])
    prompt = idx[:1, :3]
    greedy = [model.generate(prompt, 30, temperature=0) for model in (explicit, fused)]
    assert torch.equal(*greedy)
