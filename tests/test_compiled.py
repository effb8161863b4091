"""The compiled paths (device.compile=true; inductor on the CPU) compile once and compute what eager does.

A GPU replays the same compiled steps as CUDA graphs, which only pays if nothing makes them
compile again: a one-token decoding step over a static KV cache keeps its shapes across the
block's end, and a training step keeps them across the learning rate's warm-up and decay.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import nanogpt
from nanogpt.dataset.config import DatasetConfig
from nanogpt.decoding import Decoder
from nanogpt.generation.language_model import compiled_step
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime.device import DeviceConfig
from nanogpt.tracking.loggers import LoggerConfig
from nanogpt.training.config import ModelConfig, TrainConfig
from nanogpt.training.optim import OptimizerConfig
from nanogpt.training.setup import build_trainer

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def deterministic_mode_restored():
    """A compiled CPU run turns on torch's deterministic mode for its process; other tests expect it off."""
    yield
    torch.use_deterministic_algorithms(False)


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def decoding():
    """A small model, its compiled one-token step, and the static cache that step fills."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    step = compiled_step(model, CPU)
    cache = model.new_cache(1, static=True)
    prompt = torch.randint(0, 11, (1, 5))
    list(model.stream(prompt, 3, decoder=Decoder(model, cache, step)))  # compiles the step
    return model, step, cache, prompt


pytestmark = pytest.mark.slow  # inductor compiles C++ for each graph: the slow tier


def test_generation_compiles_once_for_1000_tokens_across_the_block_end(decoding):
    model, step, cache, prompt = decoding
    before = graphs_compiled()
    generator = torch.Generator().manual_seed(1)
    tokens = list(model.stream(prompt, 1000, temperature=1.0, top_k=5, generator=generator,
                               decoder=Decoder(model, cache, step)))
    assert len(tokens) == 1000  # the 64-token block filled and was refilled about 30 times
    assert graphs_compiled() == before


def test_compiled_greedy_tokens_equal_eager_ones(decoding):
    model, step, cache, prompt = decoding
    eager = model.generate(prompt, 500, temperature=0)
    decoder = Decoder(model, cache, step)
    compiled = torch.cat([prompt, *model.stream(prompt, 500, temperature=0, decoder=decoder)], dim=1)
    assert torch.equal(compiled, eager)


def run_config(corpus, data_root, compile: bool, max_iters: int, dropout: float = 0.1) -> TrainConfig:
    """A tiny float32 CPU run with warm-up and cosine decay."""
    return TrainConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=dropout),
        dataset=DatasetConfig(name="compiled", source=str(corpus)),
        device=DeviceConfig(name="cpu", compile=compile),
        optimizer=OptimizerConfig(lr=3e-3, warmup_iters=20, min_lr=3e-4),
        logger=LoggerConfig(name="none"), data_root=str(data_root), batch_size=4, eval_iters=2,
        eval_interval=max_iters, max_iters=max_iters, sample_tokens=0, save_checkpoints=False)


def losses(trainer, steps: int) -> list[float]:
    """Train steps steps on the run's schedule; each step's loss."""
    found = []
    for _ in range(steps):
        trainer.set_learning_rate()
        found.append(trainer.train_step().item())
        trainer.iter_num += 1
    return found


def test_training_compiles_once_across_warmup_and_decay(corpus, data_root, tmp_path):
    trainer = build_trainer(run_config(corpus, data_root, True, 200), tmp_path / "run")
    losses(trainer, 3)  # compiles the forward and backward
    before = graphs_compiled()
    rates = [trainer.set_learning_rate()]
    losses(trainer, 197)
    rates.append(trainer.set_learning_rate())
    assert rates[0] > rates[1]  # the rate rose through warm-up and fell through the decay in between
    assert graphs_compiled() == before


def test_compiled_training_matches_eager(corpus, data_root, tmp_path):
    # Without dropout: compiled code draws its random numbers in its own way.
    eager = build_trainer(run_config(corpus, data_root, False, 50, dropout=0.0), tmp_path / "eager")
    compiled = build_trainer(run_config(corpus, data_root, True, 50, dropout=0.0), tmp_path / "compiled")
    assert max(abs(a - b) for a, b in zip(losses(eager, 50), losses(compiled, 50), strict=True)) < 1e-5


def test_compiled_training_resumes_exactly(corpus, data_root, tmp_path):
    compiled = build_trainer(run_config(corpus, data_root, True, 50), tmp_path / "compiled")
    losses(compiled, 25)
    saved = copy.deepcopy(compiled.state_dict())  # it holds the live tensors, as torch's do
    rest = losses(compiled, 25)
    resumed = build_trainer(run_config(corpus, data_root, True, 50), tmp_path / "resumed")
    resumed.load_state_dict(saved)
    assert losses(resumed, 25) == rest  # bitwise: the same compiled kernels from the same state
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, compiled.model.state_dict()[name]), name


def test_the_server_and_lm_eval_decode_through_the_compiled_step_with_eagers_tokens(tmp_path):
    """device.compile reaches the server's Engine and lm-eval's generate_until, through the LanguageModel."""
    from lm_eval.api.instance import Instance

    from nanogpt.evaluation.lm_adapter import NanoGPTLM
    from nanogpt.generation.batching import Engine
    from nanogpt.generation.sampling import Sampling
    from nanogpt.runtime.device import CompiledOrEager

    from .test_load import VOCABULARY, write_our_checkpoint

    config = GPTConfig(vocab_size=len(VOCABULARY), block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    write_our_checkpoint(tmp_path / "run" / "best.pt", config, {"kind": "char", "vocabulary": VOCABULARY})
    eager, compiled = (nanogpt.load(tmp_path / "run", device="cpu", compile=c) for c in (False, True))
    assert isinstance(compiled.step, CompiledOrEager) and eager.step is None
    greedy = Sampling(temperature=0, max_new_tokens=80)  # past the 32-token block: refilled twice
    expected = [row[0] for row in eager.tokens(eager.encode("ROMEO:"), 1, greedy)]
    engine = Engine(compiled, 2).start()
    try:
        assert engine.decoder.step is compiled.step
        assert list(engine.generate(compiled.encode("ROMEO:"), greedy)) == expected
    finally:
        engine.stop()
    settings = {"until": ["\n\n"], "max_gen_toks": 20}
    request = Instance("generate_until", doc={}, arguments=("JULIET:", settings), idx=0)
    assert NanoGPTLM(compiled).generate_until([request]) == NanoGPTLM(eager).generate_until([request])
    assert compiled.step.failed is None  # decoded compiled, not fallen back to eager
