"""A GPT language model, written to be read from top to bottom.

GPTConfig -> CausalSelfAttention -> MLP -> Block -> GPT, and generating text with
it: a KVCache, GPT.generate and GPT.stream, sample_next_token. The decoding loop
that GPT.stream shares with every other way of generating text is a Decoder
(nanogpt/decoding.py).

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

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nanogpt.decoding import Decoder
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
    vocab_multiple: int = option(1, "round the vocabulary up to a multiple of this (GPUs: 64)")
    gelu_approximate: str = option("none", "tanh: the GELU GPT-2 was trained with; none: exact",
                                   choices=("none", "tanh"))
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass: less memory, same gradients")
    attention: str = option("sdpa", "sdpa: torch's fused kernel; explicit: the formula written out "
                            "(attention()), slower", choices=("sdpa", "explicit"))
    # Variants from later models (see the module docstring). variant=True marks an
    # option that changes the architecture away from GPT-2's (see variants below).
    position_encoding: str = option("learned", "learned: GPT-2's position table; rope: rotate q, k",
                                    choices=("learned", "rope"), variant=True)
    norm: str = option("layernorm", "rmsnorm: scale only, no mean",
                       choices=("layernorm", "rmsnorm"), variant=True)
    qk_norm: bool = option(False, "RMS-normalise each head's queries and keys", variant=True)
    activation: str = option("gelu", "relu2: relu(x) ** 2 in the MLP", choices=("gelu", "relu2"),
                             variant=True)
    # Tricks from the modded-nanogpt speedruns (each is explained where it acts):
    zero_init_proj: bool = option(False, "start the blocks' output projections at 0 (GPT.__init__)")
    logit_softcap: float = option(0.0, "bound the logits smoothly to +-this (GPT.forward); 0: off",
                                  variant=True)

    def __post_init__(self):
        check_choices(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        require(self.n_embd % self.n_head == 0,
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head")
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        require(self.logit_softcap >= 0, f"logit_softcap={self.logit_softcap} must be >= 0, 0: off")
        require(self.position_encoding != "rope" or self.head_size % 2 == 0,
                f"position_encoding=rope needs an even head size, but n_embd/n_head = "
                f"{self.head_size}")

    @property
    def variants(self) -> dict:
        """The options declared variant=True set away from GPT-2's (empty for GPT-2 itself)."""
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
    """The cosines and signed sines of the rotary angles, each (block_size, head_size).

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
    """Rotary position encoding: turn each pair of channels of x (..., head_size) by its angle.

    Rolling the channels by half a head lines each channel up with its partner,
    so (a, b) -> (a cos - b sin, b cos + a sin) is two products and a sum. The
    dot product of a rotated query and key then depends only on how far apart
    their positions are, so attention learns relative positions.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout: float = 0.0, record: dict | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v: queries (..., T, d), keys and values (..., S, d).

    Each query scores every key by a dot product, scaled by √d so the scores do not
    grow with the head size; softmax turns them into weights that sum to 1, and the
    output is the weighted sum of the values. The mask is 0 where a query may look,
    -inf where it may not; without one, query i sees keys 0 .. i, never the future.
    F.scaled_dot_product_attention fuses this; model.attention=explicit runs this.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is None:
        mask = torch.full(scores.shape[-2:], float("-inf"), device=q.device).triu(diagonal=1)
    weights = (scores + mask).softmax(dim=-1)
    if record is not None:  # GPT.hidden(record=...) keeps what each query looked at
        record.setdefault("attention", []).append(weights)
    return F.dropout(weights, p=dropout) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout: float, explicit: bool, record: dict | None = None) -> torch.Tensor:
    """attention(), by torch's fused kernel unless explicit, in the precision that is fast here.

    A CPU's fused kernel is slower in bfloat16 than in float32, so on a CPU the
    heads are attended in float32, with autocast off (it would cast them back);
    the result returns in q's precision.
    """
    dtype = q.dtype
    if q.device.type == "cpu":
        q, k, v = q.float(), k.float(), v.float()
        mask = None if mask is None else mask.float()
    with torch.autocast(q.device.type, enabled=False):
        if explicit or record is not None:  # the fused kernel keeps its weights to itself
            y = attention(q, k, v, mask, dropout, record)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=mask is None)
    return y.to(dtype)


class KVCache:
    """The keys and values a model has computed so far: each new token then costs one position.

    The buffers are allocated once, so a step of generation always has the same
    shapes (torch.compile compiles it once; a GPU replays it as a CUDA graph).
    Each row (one sequence) has its own length: a batch can hold a server's
    requests, each joining when it arrives (generation/batching.py).
    """

    def __init__(self, config: GPTConfig, batch_size: int, length: int, device: torch.device,
                 dtype: torch.dtype, static: bool = False):
        shape = (config.n_layer, batch_size, config.n_head, length, config.head_size)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens per row
        self.static = static  # attend over every slot, so that a compiled step never changes shape
        if static and device.type == "cuda":  # CUDA graphs replay reads, writes at fixed addresses
            for buffer in (self.keys, self.values, self.lengths):
                torch._dynamo.mark_static_address(buffer)

    def visible(self, positions: torch.Tensor) -> torch.Tensor:
        """The attention mask of new tokens at positions (batch, T): (batch, 1, T, slots read).

        Each sees the slots up to its own position (0), never those after it (-inf),
        which hold nothing yet or what an earlier sequence left there. A static cache
        reads all its slots; another only up to the furthest position: less work.
        """
        end = self.keys.size(3) if self.static else int(positions.max()) + 1
        after = torch.arange(end, device=positions.device) > positions[..., None]
        return torch.zeros(after.shape, dtype=self.keys.dtype, device=after.device).masked_fill(
            after, float("-inf"))[:, None]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start .. stop-1 as a cache of their own: views, so what they store lands here."""
        view = copy.copy(self)
        view.keys, view.values = self.keys[:, start:stop], self.values[:, start:stop]
        view.lengths = self.lengths[start:stop]
        return view

    def store(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Put layer's new keys and values (batch, heads, T, head_size) at positions (batch, T);
        return the layer's keys and values in its first slots.
        """
        keys, values = self.keys[layer], self.values[layer]
        where = positions[:, None, :, None].expand_as(k)  # each row's own positions, every head
        keys.scatter_(2, where, k.to(keys.dtype))
        values.scatter_(2, where, v.to(values.dtype))
        return keys[:, :, :slots], values[:, :, :slots]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the past."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        # One matrix computes queries, keys and values for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # The heads' outputs are mixed back into the residual stream.
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.layer = config.n_head, config.n_embd, layer
        self.dropout = config.dropout
        self.explicit = config.attention == "explicit"
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # unit-scale queries and keys keep attention logits in range
            self.q_norm = nn.RMSNorm(config.head_size)
            self.k_norm = nn.RMSNorm(config.head_size)
        self.rotary = config.position_encoding == "rope"
        if self.rotary:
            cos, sin = rotary_angles(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, never saved
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None,
                record: dict | None = None) -> torch.Tensor:
        """Attend over x (batch, time, n_embd), at positions (batch or 1, time; default 0, 1, ...).

        With a cache, x continues the sequences the cache holds: its keys and
        values join the cached ones, and its queries attend to those mask shows.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends independently.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # in the gains' precision: fed another, a norm warns and takes a slow path
            gains = self.q_norm.weight.dtype
            q, k = self.q_norm(q.to(gains)).to(q.dtype), self.k_norm(k.to(gains)).to(k.dtype)
        if self.rotary:
            at = positions if positions is not None else torch.arange(T, device=x.device)[None]
            cos, sin = self.rope_cos[at][:, None], self.rope_sin[at][:, None]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.store(self.layer, positions, k, v, mask.size(-1))
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0, self.explicit, record)
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

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None,
                record: dict | None = None) -> torch.Tensor:
        """Apply attention then the MLP, each as a residual update of x."""
        x = x + self.attn(self.ln_1(x), positions, cache, mask, record)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The whole language model: tokens in, next-token logits out."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict()
        self.transformer.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # tokens
        if config.position_encoding == "learned":  # rope encodes positions inside attention
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (logits, loss) for token ids idx of shape (batch, time).

        With targets, logits cover every position and loss is the mean
        cross-entropy. Without them only the last position's logits are computed,
        which is all generation needs. With a cache, idx continues the sequences
        it holds, each row from its own length.
        """
        x = self.hidden(idx, cache)
        if targets is None:
            return self.head(x[:, [-1], :]), None
        logits = self.head(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def logits_at(self, idx: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                  cache: KVCache | None = None) -> torch.Tensor:
        """The logits (N, vocab) of the token after position positions[i] of row rows[i] of idx.

        Scoring a text (evaluation, a server's echoed log-probabilities) needs the
        logits at chosen positions; the output layer, a large part of the work for
        a big vocabulary, runs at those alone.
        """
        return self.head(self.hidden(idx, cache)[rows, positions])

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None,
               record: dict | None = None) -> torch.Tensor:
        """The residual stream (batch, time, n_embd) after every block and the final norm, ln_f.
        A record (a dict) gets each block's "attention" weights and "residual" stream, as lists.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size "
                             f"{self.config.block_size}")
        positions, mask = torch.arange(T, device=idx.device)[None], None  # None: causal
        if cache is not None:
            positions = cache.lengths[:, None] + positions
            mask = cache.visible(positions)
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        recompute = (self.config.gradient_checkpointing and self.training
                     and torch.is_grad_enabled() and cache is None)
        for block in self.transformer.h:
            if recompute:
                # Keep only the block's input; rerun the block in the backward pass.
                x = checkpoint(block, x, positions, use_reentrant=False)
            else:
                x = block(x, positions, cache, mask, record)
            if record is not None:
                record.setdefault("residual", []).append(x)
        if cache is not None:
            cache.lengths += T
        return self.transformer.ln_f(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states x (..., n_embd).

        Cutting off the padded vocabulary's logits means they are never sampled
        and never enter the softmax of the loss.
        """
        logits = self.lm_head(x)[..., :self.config.vocab_size]
        cap = self.config.logit_softcap
        if cap:  # modded-nanogpt: cap * tanh(logits / cap) keeps confident logits in bounds
            logits = cap * torch.tanh(logits / cap)
        return logits

    def new_cache(self, batch_size: int, length: int | None = None,
                  dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        """An empty KVCache for batch_size sequences of up to length (block_size) tokens, in
        dtype: by default the weights', or autocast's on a GPU.
        """
        weight, kind = self.transformer.wte.weight, self.transformer.wte.weight.device.type
        if dtype is None and kind != "cpu" and torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        return KVCache(self.config, batch_size, length or self.config.block_size, weight.device,
                       dtype or weight.dtype, static)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (batch, time) by max_new_tokens sampled tokens, as nanoGPT's generate does."""
        new = self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None,
               decoder: Decoder | None = None) -> Iterator[torch.Tensor]:
        """Yield each new token, shape (batch, 1), as soon as it is sampled, so text shows live.

        With use_cache a Decoder (nanogpt/decoding.py) keeps the context in a KVCache,
        and each new token costs one position; decoder may be one the caller keeps (a
        compiled step over a static cache). Without, the whole window runs through the
        model for every token: the plain way, and the slow one. Both give the same
        tokens until the window is full; then the Decoder's refill rule decides.
        """
        if use_cache and decoder is None:
            decoder = Decoder(self, self.new_cache(idx.size(0)))
        for _ in range(max_new_tokens):
            if use_cache:
                logits = decoder.next_logits(idx)
            else:
                logits = self(idx[:, -self.config.block_size:])[0][:, -1]
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            idx = torch.cat((idx, token), dim=1)
            yield token


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits (batch, vocab); temperature 0 means greedy.

    top_k keeps only the k likeliest tokens; top_p keeps the smallest set of
    likeliest tokens whose probabilities add up to at least top_p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        dropped = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(dropped, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
