"""Run under torchrun by tests/test_fsdp.py: sharded models built shard by shard, against one process's.

Usage: ``python -m tests.sharded_init OUT SOURCE...``. Every process builds each
of a few shapes with sharding.build, and starts from each SOURCE (model.init_from)
sharded, and gathers the result whole: it must equal, bitwise, what GPT(config)
or load_pretrained gives one process from the same seed. Rank 0 writes what it
found to OUT (JSON), a record for each case; nothing is asserted here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime import sharding
from nanogpt.weights.loading import Pretrained, load_pretrained

SHAPES = {  # the rows of some weights do not divide evenly among 3 processes
    "gpt2": GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=67),
    "variants": GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=False,
                          position_encoding="rope", norm="rmsnorm", qk_norm=True, zero_init_proj=True,
                          vocab_multiple=64),
}
CPU = torch.device("cpu")


def sharded(config: GPTConfig) -> GPT:
    return sharding.build(config, CPU, torch.float32, compile=False)


def compare(whole: GPT, model: GPT, after_whole: torch.Tensor) -> dict:
    """What sets model (sharded) apart from whole (one process's), and what this process holds of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    params = list(model.parameters())
    return {
        "different": [name for name, value in whole.state_dict().items()
                      if not torch.equal(value, gathered[name])],
        "generator_as_after_one_process": torch.equal(torch.get_rng_state(), after_whole),
        "tied": model.lm_head.weight is model.transformer.wte.weight,
        "held": sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params),
        "buffers_equal": all(torch.equal(b, dict(whole.named_buffers())[name])
                             for name, b in model.named_buffers()),
    }


def main(out: Path, sources: list[str]) -> None:
    dist.init_process_group("gloo")
    found = {}
    for name, config in SHAPES.items():
        torch.manual_seed(1337)
        whole, after = GPT(config), torch.get_rng_state()
        torch.manual_seed(1337)
        found[name] = compare(whole, sharded(config), after)
    for source in sources:  # cropped to 16 positions, the vocabulary padded to a multiple of 64
        torch.manual_seed(7)
        whole, after = load_pretrained(source, block_size=16, vocab_multiple=64)[0], torch.get_rng_state()
        torch.manual_seed(7)
        model, _ = Pretrained.open(source, block_size=16, vocab_multiple=64).model(sharded)
        found[source] = compare(whole, model, after)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"processes": dist.get_world_size(), **found}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
