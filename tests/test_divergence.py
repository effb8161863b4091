"""The NaN guard: the first bad iteration is named, and no training step waits on the host."""

import os
import sys

import pytest
import torch

from nanogpt.dataset.config import DatasetConfig
from nanogpt.runtime.device import DeviceConfig
from nanogpt.runtime.stops import TrainingDiverged
from nanogpt.tracking.loggers import LoggerConfig
from nanogpt.training.config import ModelConfig, TrainConfig
from nanogpt.training.divergence import LossWatch
from nanogpt.training.setup import build_trainer


def test_loss_watch_names_the_first_bad_iteration():
    watch = LossWatch(torch.device("cpu"))
    for it, loss in enumerate([2.0, 1.9, float("inf"), float("nan"), 1.5]):
        watch.watch(torch.tensor(loss), it)
    with pytest.raises(TrainingDiverged, match="the training loss became inf at iteration 2; .*last.pt"):
        watch.check("the last good checkpoint is last.pt")


def test_loss_watch_is_quiet_while_losses_are_finite():
    watch = LossWatch(torch.device("cpu"))
    for it in range(5):
        watch.watch(torch.tensor(3.0 - it), it)
    watch.check("no checkpoint was saved yet")


def tiny_config(corpus, data_root, **changes) -> TrainConfig:
    """A few-second CPU run of a 2-layer model on corpus, with no tracker and no checkpoints."""
    return TrainConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0),
        dataset=DatasetConfig(name="watch", source=str(corpus)), device=DeviceConfig(name="cpu"),
        logger=LoggerConfig(name="none"), data_root=str(data_root), batch_size=4, eval_iters=1,
        sample_tokens=0, save_checkpoints=False, **changes)


def test_training_steps_do_not_read_the_loss_on_the_host(corpus, data_root, tmp_path, monkeypatch):
    # The platform reads a scalar on the host through Tensor.item(); between log and evaluation
    # points a step must make no such read, so the device can run ahead of the Python loop.
    # (torch's CPU AdamW reads its step counters itself: only reads from nanogpt/ count.)
    trainer = build_trainer(tiny_config(corpus, data_root, max_iters=40, log_interval=20,
                                        eval_interval=40), tmp_path / "run")
    calls = []
    original = torch.Tensor.item

    def counted_item(self):
        if f"{os.sep}nanogpt{os.sep}" in sys._getframe(1).f_code.co_filename:
            calls.append(sys._getframe(1).f_code.co_name)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    trainer.run()
    # 2 log points (iterations 0 and 20) and 2 evaluations (0 and 40), a few reads each;
    # one read per step would make it more than 40.
    assert 0 < len(calls) <= 16


def test_a_nan_between_log_points_is_caught_at_the_next_one(corpus, data_root, tmp_path):
    trainer = build_trainer(tiny_config(corpus, data_root, max_iters=30, log_interval=10,
                                        eval_interval=30), tmp_path / "run")
    step = trainer.train_step

    def diverging_step():
        loss = step()
        return loss * float("nan") if trainer.iter_num == 13 else loss

    trainer.train_step = diverging_step
    with pytest.raises(TrainingDiverged, match="became nan at iteration 13"):
        trainer.run()
    assert trainer.iter_num == 20  # noticed at the log point of iteration 20, not later
