"""Weight-only int8 quantisation, for generating text faster on a CPU.

Generating a token multiplies one activation vector by every weight matrix, so
each token reads all the weights once: a memory-bound, matrix-vector product.
On a CPU that is slow in float32 (about 8 ms per token for the 6-layer,
384-wide Shakespeare model on two cores, where 42 MB of weights spill out of the
cache) and torch has a kernel for exactly this case: int8 weights with one
float scale per output row, multiplied by bfloat16 activations. Stored that way
the weights take a quarter of the bytes, and each Linear is about ten times
faster for one token. Everything else (embeddings, norms, attention, the KV
cache) stays in the model's own precision. The text differs a little from the
unquantised model's, as from any change of precision; ``nanogpt.eval
quantize=int8`` measures by how much on held-out text.
"""

from __future__ import annotations

import torch
from torch import nn

from nanogpt.errors import ConfigError

QUANTIZATIONS = (None, "int8")


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with one scale per output row (symmetric, round to nearest)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # The largest magnitude of each row maps to 127, so no row loses more than half a step of 1/127.
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel takes bfloat16 activations: float32 ones take a path ten times slower.
        flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scale).view(*x.shape[:-1], -1)
        # Adding the bias (in x's precision) casts the bfloat16 product exactly as .to() would:
        # one operator fewer of the ~150 a token costs.
        return y.to(x.dtype) if self.bias is None else torch.add(self.bias.to(x.dtype), y)


def quantize_model(model: nn.Module, how: str | None, device: torch.device) -> nn.Module:
    """Replace every nn.Linear of model (in place) as how asks; None leaves the model as it is.

    A tied output layer gets its own int8 copy; the embedding it shares stays as it was.
    """
    if how is None:
        return model
    if device.type != "cpu":
        raise ConfigError(f"quantize={how} runs on the CPU only (torch's int8 kernel); on {device.type} "
                          "leave it out: device.dtype=bfloat16 is the fast path there")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                # torch's kernel reads the inner dimension 16 values at a time, and gives wrong
                # results (or crashes) for any other width.
                if child.in_features % 16:
                    raise ConfigError(f"quantize={how} needs layer widths in multiples of 16; the model "
                                      f"has a {child.in_features}-wide input ({name}); leave it out")
                setattr(module, name, Int8Linear(child))
    return model
