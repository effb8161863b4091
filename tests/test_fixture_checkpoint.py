"""Checkpoints written before the package was rearranged (commit 5c9822f) still load, sample and resume.

tests/fixtures/run_5c9822f is a tiny run (2 layers, 32 wide, characters of corpus.txt) that
the code of 5c9822f trained for 6 steps; expected.json holds what that code computed from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import nanogpt
from tests.conftest import run_module

FIXTURE = Path(__file__).parent / "fixtures" / "run_5c9822f"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def test_old_checkpoint_gives_the_same_logits():
    lm = nanogpt.load(FIXTURE, device="cpu")
    ids = lm.encode(EXPECTED["prompt"])
    assert ids == EXPECTED["ids"]
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ids]), torch.tensor([ids]))
    torch.testing.assert_close(logits[0, -1], torch.tensor(EXPECTED["logits_last"]), atol=1e-5, rtol=1e-5)
    assert lm.generate(EXPECTED["greedy_prompt"], max_new_tokens=30, temperature=0) == EXPECTED["greedy_30"]


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_old_checkpoint_is_scored_by_eval(tmp_path):
    done = run_module("nanogpt.eval", f"ckpt={FIXTURE}", "device=cpu", "dataset=text",
                      f"dataset.source={FIXTURE / 'corpus.txt'}", "dataset.name=fixture",
                      f"data_root={tmp_path}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 3.0 < result["loss"] < 3.6  # barely trained: near ln(vocab)


def test_old_last_pt_resumes(tmp_path):
    from nanogpt.cli.entry import to_dataclass
    from nanogpt.training.config import TrainConfig
    from nanogpt.training.setup import build_trainer
    from nanogpt.weights.checkpoint import load_checkpoint

    cfg = OmegaConf.load(FIXTURE / "config.yaml")
    cfg.dataset.source, cfg.data_root, cfg.max_iters = str(FIXTURE / "corpus.txt"), str(tmp_path / "data"), 8
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(FIXTURE / "last.pt", run_dir / "last.pt")
    trainer = build_trainer(to_dataclass(cfg, TrainConfig), run_dir, OmegaConf.to_container(cfg),
                            resume=load_checkpoint(run_dir / "last.pt"))
    assert trainer.iter_num == EXPECTED["iter_num"]
    trainer.run()
    assert trainer.iter_num == 8
    assert trainer.best_val_loss == pytest.approx(EXPECTED["resumed_to_8_best_val_loss"], abs=1e-4)
