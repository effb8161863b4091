"""A compiled path that fails at run time costs speed, never the run: one warning, then eager.

torch.compile compiles at the first call, so each failure is driven through a real first call
on the CPU: a graph break under fullgraph, a CUDA graph capture that refuses (simulated: a CPU
captures nothing), the recompile limit, and a machine without a working C++ compiler. The
results are eager's: equal where the fallback comes before the first step or token, within
1e-5 where it comes later. Inductor's C++ compiles are the slow tier's.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import nanogpt
from nanogpt import model as model_module
from nanogpt.runtime.device import CompiledOrEager
from nanogpt.training.setup import build_trainer

from .test_compiled import losses, run_config
from .test_load import VOCABULARY, write_our_checkpoint

CAPTURE_REFUSED = "CUDA error: operation not permitted when stream is capturing"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing, and leaves torch's deterministic mode as it found it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fallback") / "run"
    config = model_module.GPTConfig(vocab_size=len(VOCABULARY), block_size=32, n_layer=2, n_head=2,
                                    n_embd=32, dropout=0.0)
    write_our_checkpoint(run / "best.pt", config, {"kind": "char", "vocabulary": VOCABULARY})
    return run


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "nanogpt.device" and record.levelno == logging.WARNING]


def test_a_graph_break_in_the_one_token_step_warns_once_and_gives_eagers_tokens(run, monkeypatch, caplog):
    eager = nanogpt.load(run, device="cpu").generate("ROMEO:", max_new_tokens=60, temperature=0)
    attend = model_module.attend

    def breaking(*args):
        torch._dynamo.graph_break()  # nothing eagerly; under fullgraph=True, a refusal
        return attend(*args)

    monkeypatch.setattr(model_module, "attend", breaking)
    lm = nanogpt.load(run, device="cpu", compile=True)
    with caplog.at_level(logging.WARNING, logger="nanogpt.device"):
        assert lm.generate("ROMEO:", max_new_tokens=60, temperature=0) == eager
        assert lm.generate("JULIET:", max_new_tokens=5, temperature=0)  # eager from then on, quietly
    [warning] = warnings_of(caplog)
    assert "generation's one-token step" in warning and "graph_break" in warning
    assert "device.compile=false" in warning and "\n" not in warning


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_refused_capture_in_the_first_training_step_trains_as_eager_does(corpus, data_root, tmp_path,
                                                                            caplog):
    # Without dropout: the two trainers draw it from the one global generator, one after the other.
    eager = build_trainer(run_config(corpus, data_root, False, 20, dropout=0.0), tmp_path / "eager")
    graphed = build_trainer(run_config(corpus, data_root, True, 20, dropout=0.0), tmp_path / "graphed")
    assert isinstance(graphed.forward, CompiledOrEager)

    def capture(*args, **kwargs):
        raise RuntimeError(CAPTURE_REFUSED)

    graphed.forward.compiled = capture  # what a GPU that refuses to capture the graph raises
    with caplog.at_level(logging.WARNING, logger="nanogpt.device"):
        assert losses(graphed, 20) == losses(eager, 20)  # bitwise eager's
    [warning] = warnings_of(caplog)
    assert "the training step" in warning and CAPTURE_REFUSED in warning


def test_the_recompile_limit_is_detected_and_the_calls_go_on_eagerly(caplog):
    calls = []

    def double(x):
        calls.append(x.shape)
        return x * 2

    step = CompiledOrEager(torch.compile(double, backend="eager", dynamic=False), double, "double",
                           "device.compile=false")
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING):
        assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
        assert step.failed is None  # compiled
        assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))  # a second shape: the limit
    assert step.failed is not None and "recompile" in step.failed.lower()
    [warning] = warnings_of(caplog)
    assert "double" in warning


def test_an_error_that_is_not_the_compilers_is_raised_as_it_is():
    def broken(x):
        raise ValueError("the model's own mistake")

    step = CompiledOrEager(torch.compile(broken, backend="eager"), broken, "broken", "device.compile=false")
    with pytest.raises(ValueError, match="own mistake") as raised:
        step(torch.ones(2))
    assert raised.value.__context__ is None  # not chained to a compiler's error: the user's alone


@pytest.mark.slow
def test_without_a_working_cpp_compiler_sampling_warns_and_gives_eagers_tokens(run, monkeypatch, caplog):
    eager = nanogpt.load(run, device="cpu").generate("ROMEO:", max_new_tokens=40, temperature=0)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)  # really compile
    lm = nanogpt.load(run, device="cpu", compile=True)
    with caplog.at_level(logging.WARNING, logger="nanogpt.device"):
        assert lm.generate("ROMEO:", max_new_tokens=40, temperature=0) == eager
    [warning] = warnings_of(caplog)
    assert "C++ compiler" in warning and "device.compile=false" in warning


@pytest.mark.slow
def test_the_recompile_limit_hit_at_the_first_evaluation_trains_on_within_1e_5(corpus, data_root, tmp_path,
                                                                              caplog):
    """The step compiles for training; the evaluation (no gradients) would be a second graph."""
    eager = build_trainer(run_config(corpus, data_root, False, 10, dropout=0.0), tmp_path / "eager")
    compiled = build_trainer(run_config(corpus, data_root, True, 10, dropout=0.0), tmp_path / "compiled")
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING):
        first = losses(compiled, 5), losses(eager, 5)
        compiled.evaluate(), eager.evaluate()  # the limit: no second graph, eager from here
        second = losses(compiled, 5), losses(eager, 5)
    assert compiled.forward.failed is not None
    for ours, theirs in (first, second):
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-5
    assert len(warnings_of(caplog)) == 1
