"""A GPT language model, written to be read from top to bottom.

GPTConfig -> CausalSelfAttention -> MLP -> Block -> GPT.

The architecture is GPT-2's: token embeddings plus learned position embeddings,
a stack of pre-LayerNorm transformer blocks (attention, then an MLP, each added
back onto a residual stream), a final LayerNorm, and an output layer that shares
its weights with the token embedding. This file imports no configuration
machinery: build a GPTConfig, pass it to GPT, and you have a model.

Four later ideas can be switched on in GPTConfig (all off by default, so the
model stays GPT-2's): rotary positions, RMSNorm, normalised queries and keys,
and a squared-ReLU MLP; and two tricks from the modded-nanogpt speedruns:
zero-initialised output projections and soft-capped logits. Each is a few
lines next to the part it changes. The other switches change how the same
model is computed or stored, not what it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nanogpt.generation.decoding import KVCache, decode
from nanogpt.options import check_choices, option, require


@dataclass
class GPTConfig:
    """The shape of a GPT. The defaults are the small character-level model.

    Each field is declared once, with its meaning and allowed values; the
    command line (model.KEY=VALUE), its --help and its checks all read them.
    """

    vocab_size: int = option(65, "number of distinct tokens (65 characters in Tiny Shakespeare)")
    block_size: int = option(256, "the longest context the model can look at")
    n_layer: int = option(6, "transformer blocks stacked on top of each other")
    n_head: int = option(6, "attention heads per block; n_embd must divide evenly among them")
    n_embd: int = option(384, "width of the residual stream")
    dropout: float = option(0.1, "dropout probability during training (0 disables it)")
    bias: bool = option(True, "biases in Linear and LayerNorm layers, as in GPT-2")
    # GPU matrix multiplies are faster on round sizes (GPT-2: 50257 -> 50304). The
    # extra rows are never looked up and their logits are cut off, so the model
    # and its loss are exactly those of the unpadded vocabulary.
    vocab_multiple: int = option(1, "round the vocabulary up to a multiple of this (64 for GPT-2 on GPUs)")
    gelu_approximate: str = option("none", "tanh: the GELU GPT-2 was trained with; none: exact",
                                   choices=("none", "tanh"))
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass: less memory, same gradients")
    attention: str = option("sdpa", "sdpa: torch's fused scaled_dot_product_attention; explicit: the same "
                            "formula written out (see attention()), slower", choices=("sdpa", "explicit"))
    # Variants from later models (off by default; see the module docstring). variant=True marks
    # an option that changes the architecture away from GPT-2's (see variants below).
    position_encoding: str = option("learned", "learned: GPT-2's position table; rope: rotate q and k",
                                    choices=("learned", "rope"), variant=True)
    norm: str = option("layernorm", "rmsnorm: scale only, no mean", choices=("layernorm", "rmsnorm"),
                       variant=True)
    qk_norm: bool = option(False, "RMS-normalise each head's queries and keys before attention", variant=True)
    activation: str = option("gelu", "relu2: relu(x) ** 2 in the MLP", choices=("gelu", "relu2"),
                             variant=True)
    # Tricks from the modded-nanogpt speedruns (off by default; each is explained where it acts):
    zero_init_proj: bool = option(False, "start the blocks' output projections at zero (see GPT.__init__)")
    logit_softcap: float = option(0.0, "bound the logits smoothly to +-this (see GPT.forward); 0: off",
                                  variant=True)

    def __post_init__(self):
        check_choices(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        require(self.n_embd % self.n_head == 0,
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head")
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        require(self.logit_softcap >= 0, f"logit_softcap={self.logit_softcap} must be >= 0 (0: off)")
        require(self.position_encoding != "rope" or self.head_size % 2 == 0,
                f"position_encoding=rope needs an even head size, but n_embd/n_head = {self.head_size}")

    @property
    def variants(self) -> dict:
        """The options declared variant=True that are set away from GPT-2's (empty for GPT-2 itself)."""
        return {f.name: getattr(self, f.name) for f in fields(GPTConfig)
                if f.metadata.get("variant") and getattr(self, f.name) != f.default}

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


def make_norm(config: GPTConfig, width: int) -> nn.Module:
    """The normalisation layer config.norm asks for, over the last dimension of size width.

    LayerNorm subtracts the mean and divides by the standard deviation, then
    scales (and shifts, with bias). RMSNorm only divides by the root mean square
    and scales: one statistic fewer, and in practice as good.
    """
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width)
    return nn.LayerNorm(width, bias=config.bias)


def rotary_angles(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosines and signed sines of the rotary angles, each of shape (block_size, head_size).

    Channel i of a head is paired with channel i + head_size // 2, and pair i
    turns by position * 10000 ** (-2i / head_size): fast-turning pairs tell near
    positions apart, slow ones far positions. Each angle appears twice, once per
    channel of its pair, the sine with the sign that channel's turn needs.
    """
    half = config.head_size // 2
    frequencies = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), frequencies)
    return angles.cos().repeat(1, 2), torch.cat((-angles.sin(), angles.sin()), dim=1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position encoding: turn each pair of channels of x (..., time, head_size) by its angle.

    Rolling the channels by half a head lines each channel up with its partner,
    so (a, b) -> (a cos - b sin, b cos + a sin) is two products and a sum. The
    dot product of a rotated query and key then depends only on how far apart
    their positions are, so attention learns relative positions.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) booleans, True where query i may see key j: the T queries are the last T of S positions."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
              dropout: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √d, the future masked) v for queries (..., T, d) over keys and values (..., S, d).

    Each query scores every key by a dot product, scaled by √d so the scores do
    not grow with the head size; softmax turns a query's scores into weights
    that sum to 1, and the output is the weighted sum of the values. The causal
    mask gives the future a score of -inf (weight 0). The T queries are the
    last T of the S positions, so query i sees keys 0 .. S - T + i. This is what
    F.scaled_dot_product_attention computes in one fused kernel, without ever
    storing the (T, S) weights; model.attention=explicit runs this instead.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout)
    return weights @ v


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the past."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        # One matrix computes queries, keys and values for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # The heads' outputs are mixed back into the residual stream.
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.explicit = config.attention == "explicit"
        if self.qk_norm:  # unit-scale queries and keys keep attention logits in range
            self.q_norm = nn.RMSNorm(config.head_size)
            self.k_norm = nn.RMSNorm(config.head_size)
        self.rotary = config.position_encoding == "rope"
        if self.rotary:
            cos, sin = rotary_angles(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, never saved
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Attend over the sequence x of shape (batch, time, n_embd)."""
        B, T, C = x.size()
        qkv = self.c_attn(x)
        # scaled_dot_product_attention picks a fused (flash) kernel where one exists. A CPU's is
        # slower in bfloat16 than in float32, so there the heads work in float32 until their
        # output is projected (and autocast is off around the kernel, which would cast back).
        dtype = torch.float32 if x.device.type == "cpu" else qkv.dtype
        q, k, v = qkv.to(dtype).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends independently.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # in the gains' precision: fed another, a norm warns and takes a slow path
            gains = self.q_norm.weight.dtype
            q, k = self.q_norm(q.to(gains)).to(dtype), self.k_norm(k.to(gains)).to(dtype)
        if self.rotary:
            start = cache.length if cache is not None else 0  # position of the first token in x
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)

        # The causal mask hides the future. A single new token after a filled cache
        # is the last position, so it may look at every cached key: no mask is needed.
        is_causal = True
        if cache is not None:
            is_causal = cache.length == 0 or T > 1
            k, v = cache.append(k, v)
            k, v = k.to(dtype), v.to(dtype)  # the cache keeps the model's own precision

        dropout = self.dropout if self.training else 0.0
        with torch.autocast("cpu", enabled=False):
            if self.explicit:
                y = attention(q, k, v, is_causal, dropout)
            elif is_causal and k.size(-2) != T:
                # Several new tokens after cached ones: the fused kernel's is_causal would align the
                # mask to the first key, not the last, so the mask is given (see attention above).
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, k.size(-2), q.device),
                                                   dropout_p=dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal)
            y = y.to(qkv.dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x) ** 2: as sparse as ReLU but smooth at zero, and cheaper than GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """A position-wise feed-forward network: widen 4x, GELU (or relu2), project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        if config.activation == "relu2":
            self.activation = ReLUSquared()
        else:
            self.activation = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform each position of x on its own."""
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block: attention to communicate, an MLP to compute.

    Pre-LayerNorm: each sub-layer sees a normalised copy of the residual stream
    and adds its result back, so the stream itself is never normalised away and
    gradients flow straight through the additions.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Apply attention then the MLP, each as a residual update of x."""
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The whole language model: tokens in, next-token logits out."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict()
        self.transformer.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # token embeddings
        if config.position_encoding == "learned":  # rope encodes positions inside attention instead
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying: reading a token in and writing it out use the same vectors,
        # which saves parameters and tends to help small models.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init: every block adds two projections onto the residual
        # stream, so shrink them to keep its variance from growing with depth.
        # zero_init_proj (modded-nanogpt) goes all the way: each block starts as the
        # identity, and the stream carries the embeddings untouched until training
        # grows the projections; the first steps then shape the blocks' inputs freely.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                std = 0.0 if config.zero_init_proj else 0.02 / math.sqrt(2 * config.n_layer)
                nn.init.normal_(param, mean=0.0, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: small normal weights, zero biases."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Count parameters; by default leave out the position embeddings.

        The token embedding is shared with lm_head, so it counts once and stays in.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (logits, loss) for token ids idx of shape (batch, time).

        With targets, logits cover every position and loss is the mean
        cross-entropy. Without them only the last position's logits are computed,
        which is all generation needs. With caches, idx continues the sequence
        the caches already hold.
        """
        B, T = idx.size()
        start = caches[0].length if caches else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {start + T} is longer than block_size {self.config.block_size}"
            )
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute and not caches:
                # Keep only the block's input; rerun the block in the backward pass.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, caches[i] if caches else None)
        x = self.transformer.ln_f(x)

        # Cutting off the padded vocabulary's logits means they are never sampled
        # and never enter the softmax of the loss.
        vocab_size, cap = self.config.vocab_size, self.config.logit_softcap
        logits = self.lm_head(x if targets is not None else x[:, [-1], :])[..., :vocab_size]
        if cap:  # modded-nanogpt: cap * tanh(logits / cap) keeps confident logits from running away
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_caches(self, batch_size: int, length: int | None = None) -> list[KVCache]:
        """Empty KV caches, one per block, for batch_size sequences of length (block_size) tokens."""
        c, length = self.config, length or self.config.block_size
        return [KVCache(batch_size, c.n_head, length, c.head_size, self.transformer.wte.weight)
                for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Return idx (batch, time) extended by max_new_tokens sampled tokens, as nanoGPT's does."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator))
        return torch.cat([idx, *new], dim=1)

    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield each new token, shape (batch, 1), as soon as it is sampled: see generation/decoding.py."""
        return decode(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
