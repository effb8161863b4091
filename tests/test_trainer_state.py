"""The Trainer owns its state: state_dict() holds what training has reached; load_state_dict() restores it."""

from __future__ import annotations

import copy
import random

import numpy as np
import torch

from nanogpt.dataset.config import DatasetConfig
from nanogpt.runtime.device import DeviceConfig
from nanogpt.tracking.loggers import LoggerConfig
from nanogpt.training.config import ModelConfig, TrainConfig
from nanogpt.training.setup import build_trainer


def config(corpus, data_root, optimizer: str = "adamw") -> TrainConfig:
    """A tiny CPU run with dropout, so every random generator matters."""
    from nanogpt.training.optim import OptimizerConfig

    return TrainConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.2),
        dataset=DatasetConfig(name="state", source=str(corpus)), device=DeviceConfig(name="cpu"),
        optimizer=OptimizerConfig(name=optimizer, warmup_iters=2), logger=LoggerConfig(name="none"),
        data_root=str(data_root), batch_size=4, eval_iters=2, eval_interval=3, max_iters=5,
        sample_tokens=0, save_checkpoints=False)


def clock_apart(state: dict) -> float:
    """Take the run's wall time out of a state (the clock runs on between two state_dict() calls)."""
    return state["training"].pop("wall_time_s")


def assert_same(a, b, where: str = "state") -> None:
    """Equal all the way down: tensors elementwise, containers by their items."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_a_round_trip_restores_everything_state_dict_returned(corpus, data_root, tmp_path):
    trained = build_trainer(config(corpus, data_root), tmp_path / "a")
    trained.run()  # 5 steps: optimizer moments, scaler, sampler, batch ahead, best loss all moved
    saved = trained.state_dict()
    assert saved["iter_num"] == 5 and saved["training"]["batch"] is not None

    # A fresh trainer with other random state everywhere, then the saved state put back.
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    fresh = build_trainer(config(corpus, data_root), tmp_path / "b")
    fresh.sampler.generator.manual_seed(99)
    fresh.load_state_dict(saved)
    restored = fresh.state_dict()
    # The run's wall time goes on from the saved one (fresh's own few seconds added, not started anew).
    taken, went_on = clock_apart(saved), clock_apart(restored)
    assert taken > 0 and taken <= went_on < taken + 60
    assert_same(restored, saved)


def three_more_steps(trainer) -> dict:
    """Train three steps (dropout, the sampler and the optimizer all take part); the state after them."""
    for _ in range(3):
        trainer.train_step()
    state = trainer.state_dict()
    clock_apart(state)
    return state


def test_a_loaded_trainer_goes_on_exactly_as_the_original(corpus, data_root, tmp_path):
    for optimizer in ("adamw", "muon"):
        original = build_trainer(config(corpus, data_root, optimizer), tmp_path / f"{optimizer}-a")
        original.run()
        saved = copy.deepcopy(original.state_dict())  # it holds the live tensors, as torch's do
        expected = three_more_steps(original)
        loaded = build_trainer(config(corpus, data_root, optimizer), tmp_path / f"{optimizer}-b")
        loaded.load_state_dict(saved)
        assert_same(three_more_steps(loaded), expected, optimizer)


def test_a_rewind_puts_back_what_an_abandoned_step_changed(corpus, data_root, tmp_path):
    trainer = build_trainer(config(corpus, data_root), tmp_path / "run")
    trainer.run()
    before = trainer.state_dict()
    clock_apart(before)
    rewind = trainer.rewind_point()
    trainer.batch = trainer.sampler.get_batch("train")  # what a step begins with
    loss = trainer.model(*trainer.batch)[1]
    loss.backward()
    torch.rand(3), random.random(), np.random.rand()
    rewind()
    after = trainer.state_dict()
    clock_apart(after)
    assert_same(after, before)
    assert all(p.grad is None for p in trainer.model.parameters())
