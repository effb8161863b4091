"""Every command and Python block in README.md, docs/ and experiments/ still works.

A renamed key, group, command or module fails here rather than in a reader's terminal:

- each ``python -m nanogpt.X`` / ``nanogpt-X`` / ``torchrun ... -m nanogpt.X`` of a Hydra command is
  composed in-process by Hydra (sweeps reduced to their first value, ``-m`` dropped) and turned into
  the command's schema with the same ``to_dataclass`` the command uses;
- torchrun's own options go through torchrun's parser and launch configuration, which must not warn;
- ``nanogpt.report`` runs on a run this module trains, ``nanogpt.text.gpt2_files`` into a temporary folder;
- every ```python block runs against that run (the placeholder run directory replaced by it);
- every relative link points at a file and, where it names one, a heading that exists.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from nanogpt.cli.entry import to_dataclass
from nanogpt.cli.overrides import parse_overrides
from nanogpt.cli.paths import CONFIG_DIR

from .conftest import REPO, TINY_RUN, register_commands, run_module

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
         *sorted((REPO / "experiments").glob("*.md"))]
RUN_PLACEHOLDER = "outputs/2026-11-22/10-31-07"  # the run directory the pages' Python blocks load
# A line that names one of our commands; each must yield at least one checked command.
MENTIONS_COMMAND = re.compile(r"python3? -m nanogpt\.|(^|[\s(\"'])nanogpt-[a-z]|\btorchrun\b")
# A code span in the text that is a whole command (NAME-like placeholders are not).
INLINE_COMMAND = re.compile(r"(python3? -m nanogpt\.[a-z_.]+|nanogpt-[a-z]+)( |$)|torchrun ")
# Hydra's own flags that take a value (the value is not an override).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--shell-completion", "-sc"}
FLAGS = {"-m", "--multirun", "--help", "-h"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    """One command found on a page: which module, its arguments, and torchrun's when launched by it."""

    where: str  # page:line
    module: str  # e.g. train, report, text.gpt2_files
    args: list[str]
    torchrun: list[str] | None = None
    named: bool = False  # named in the text (no arguments, or a synopsis with [optional] parts), not run

    def __str__(self) -> str:
        return self.where


def bash_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, line) of the page's ```bash blocks, with continued lines joined."""
    found, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_block = line.strip() == "```bash" and not in_block
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found.append((start, pending + line))
        pending = ""
    return found


def segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line: split at && || ; |, with each $(...) a command of its own."""
    inner = re.findall(r"\$\(([^()]*)\)", line)
    result, current = [shlex.split(command, comments=True) for command in inner], []
    for token in shlex.split(re.sub(r"\$\([^()]*\)", "SUBSTITUTED", line), comments=True):
        if token in ("&&", "||", ";", "|"):
            result.append(current)
            current = []
        else:
            current.append(token)
    return [*result, current]


def command_of(where: str, words: list[str]) -> Command | None:
    """Our command in one simple shell command, or None if it runs something else."""
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in ("time", "/usr/bin/time", "-v")):
        words = words[1:]
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m":
        if words[2].startswith("nanogpt."):
            return Command(where, words[2].removeprefix("nanogpt."), words[3:])
    elif words and words[0].startswith("nanogpt-"):
        return Command(where, words[0].removeprefix("nanogpt-"), words[1:])
    elif words and words[0] == "torchrun":
        module = next((i for i, word in enumerate(words) if word.startswith("nanogpt.")), None)
        if module is None:
            return None
        return Command(where, words[module].removeprefix("nanogpt."), words[module + 1:], words[1:])
    return None


def inline_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of the `code spans` outside fenced blocks that are a whole command."""
    text = re.sub(r"```.*?```", lambda block: "\n" * block.group().count("\n"), page.read_text(), flags=re.S)
    return [(text[:span.start()].count("\n") + 1, " ".join(span.group(1).split()))
            for span in re.finditer(r"`([^`]+)`", text) if INLINE_COMMAND.match(span.group(1))]


def page_commands() -> tuple[list[Command], list[str]]:
    """Every command on the pages, and the lines that mention one but yielded none."""
    commands, unparsed = [], []
    for page in PAGES:
        name = page.relative_to(REPO)
        for number, span in inline_commands(page):
            found = [c for simple in segments(span) if (c := command_of(f"{name}:{number}", simple))]
            for command in found:
                command.named = not command.args or " [" in span
            commands += found
        for number, line in bash_lines(page):
            where = f"{name}:{number}"
            try:
                words = segments(line)
            except ValueError as error:  # what a shell would refuse too (an unclosed quote)
                unparsed.append(f"{where}: {error}: {line.strip()}")
                continue
            found = [c for simple in words if (c := command_of(where, simple))]
            commands += found
            if not found and MENTIONS_COMMAND.search(" ".join(sum(words, []))):
                unparsed.append(f"{where}: {line.strip()}")
    return commands, unparsed


COMMANDS, UNPARSED = page_commands()
HYDRA_COMMANDS = [c for c in COMMANDS if c.module not in ("report", "text.gpt2_files", "benchmarks.serving")]


def once_each(commands: list[Command]) -> list[Command]:
    """The commands with those written the same way on several lines kept once (composing takes time)."""
    unique = {}
    for command in commands:
        unique.setdefault((command.module, tuple(command.args), command.named), command)
    return list(unique.values())


def python_blocks() -> list[tuple[str, str]]:
    """(page:line, code) of every ```python block on the pages."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            line = text[:match.start()].count("\n") + 1
            blocks.append((f"{page.relative_to(REPO)}:{line}", match.group(1)))
    return blocks


PYTHON_BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def schemas() -> dict[str, type]:
    """Each registered command's schema, as its hydra_entry registered it."""
    register_commands()
    store = ConfigStore.instance()
    names = [name.removesuffix("_schema.yaml") for name in store.list("") if name.endswith("_schema.yaml")]
    return {name: OmegaConf.get_type(store.load(f"{name}_schema.yaml").node) for name in names}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory written by a real, tiny training run."""
    root = tmp_path_factory.mktemp("docs")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"{name}: I speak of {thing}.\n" for name in ("ROMEO", "JULIET", "NURSE")
                              for thing in ("love", "the moon", "swords")) * 200
                      + "".join(map(chr, range(32, 127))) + "\n")  # every ASCII character: the pages chat too
    run_dir = root / "outputs" / "run"
    result = run_module("nanogpt.train", *TINY_RUN, "dataset=text", f"dataset.source={corpus}",
                        "dataset.name=docs", f"data_root={root / 'data'}", "max_iters=10", "eval_interval=10",
                        "logger=none", f"hydra.run.dir={run_dir}", cwd=root)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_the_pages_hold_commands_and_every_command_line_is_read():
    assert not UNPARSED, "lines that name a command but were not read as one:\n" + "\n".join(UNPARSED)
    assert {c.module for c in COMMANDS} >= {"train", "sample", "eval", "data", "export", "bench", "report",
                                            "text.gpt2_files"}
    assert len(HYDRA_COMMANDS) > 100


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job: a,b,c becomes a (lists like [a,b] stay lists)."""
    return [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override()
            else o.input_line for o in parse_overrides(overrides)]


@pytest.mark.parametrize("command", once_each(HYDRA_COMMANDS), ids=str)
def test_hydra_command_composes_against_its_schema(command, schemas):
    assert command.module in schemas, (
        f"{command}: python -m nanogpt.{command.module} is not a command registered in "
        "tests/conftest.py:register_commands")
    if command.named:
        return
    overrides, words = [], iter(command.args)
    for word in words:
        if word in FLAGS_WITH_VALUE:
            next(words)
        elif word.startswith("-"):
            assert word in FLAGS, f"{command}: flag {word} is not one this test knows"
        else:
            overrides.append(re.sub(r"\$\{?(\w+)\}?", r"\1", word))  # $SLURM_JOB_ID -> SLURM_JOB_ID
    overrides = first_of_each_sweep(overrides)
    with_hydra = any(o.split("=")[0].lstrip("+~").startswith("hydra") for o in overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(command.module, overrides=overrides, return_hydra_config=with_hydra)
    if with_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    to_dataclass(cfg, schemas[command.module])


TORCHRUN = [c for c in COMMANDS if c.torchrun is not None]


def torchrun_launch(arguments: list[str], monkeypatch, caplog):
    """The launch configuration torchrun makes of arguments, and the warnings it logged making it.

    Torchrun's real parser and configuration run; only the final start of the worker processes is
    replaced by a record of what would start (tests/test_distributed.py starts real ones).
    """
    import torch.distributed.run as torchrun

    launched = []
    monkeypatch.setattr(torchrun, "elastic_launch",
                        lambda config, entrypoint: lambda *args: launched.append((config, entrypoint, args)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else torchrun's notice that it sets this for every worker
    with caplog.at_level(logging.WARNING):
        torchrun.run(torchrun.parse_args(arguments))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return launched[0][0], launched[0][2], warnings


@pytest.mark.parametrize("command", TORCHRUN, ids=str)
def test_torchrun_takes_the_options_without_a_warning(command, monkeypatch, caplog):
    config, args, warnings = torchrun_launch(command.torchrun, monkeypatch, caplog)
    assert not warnings, f"{command}: torchrun warned: {warnings}"
    args = list(args)
    assert args[args.index("-m"):] == ["-m", f"nanogpt.{command.module}", *command.args]


def test_the_multi_node_page_gives_torchrun_both_ways_to_meet(monkeypatch, caplog):
    """Static (node rank and node 0's address) and c10d rendezvous (no rank), as torchrun pairs its flags."""
    page = [c for c in TORCHRUN if c.where.startswith("docs/distributed.md")]
    two_nodes = [c for c in page if "--nnodes=2" in c.torchrun]
    backends = {}
    for command in two_nodes:
        config, _, _ = torchrun_launch(command.torchrun, monkeypatch, caplog)
        assert (config.min_nodes, config.max_nodes) == (2, 2)
        backends.setdefault(config.rdzv_backend, []).append(config)
    assert sorted(config.rdzv_configs["rank"] for config in backends["static"]) == [0, 1]
    assert all(not any(a.startswith("--node_rank") for a in c.torchrun)
               for c in two_nodes if "--rdzv_backend=c10d" in c.torchrun)
    assert backends["c10d"] and all(config.run_id and config.rdzv_endpoint for config in backends["c10d"])


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.module == "report" and not c.named], ids=str)
def test_report_command_runs(command, tiny_run, tmp_path, capsys):
    from nanogpt import report

    argv, words = [], iter(command.args)
    for word in words:
        if word == "--out":
            argv += ["--out", str(tmp_path / next(words).replace("/", "_"))]
        elif word.startswith("-"):
            argv.append(word)
        elif word != "...":
            argv.append(str(tiny_run))  # a run, whatever the page's placeholder
    report.main(argv)
    written = capsys.readouterr().err.strip().removeprefix("wrote ").split(", ")
    assert written and all(Path(path).is_file() for path in written), written


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.module == "text.gpt2_files" and not c.named],
                         ids=str)
def test_gpt2_files_command_seeds_a_folder(command, tmp_path, monkeypatch):
    from nanogpt.text import gpt2_files

    assert len(command.args) <= 1, f"{command}: takes at most a folder"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_default"))  # its default, kept here
    monkeypatch.setattr(sys, "argv", ["gpt2_files", *[str(tmp_path / "given") for _ in command.args]])
    gpt2_files.main()
    seeded = tmp_path / ("given" if command.args else "tiktoken_default")
    assert len(list(seeded.iterdir())) == 2  # encoder.json and vocab.bpe, under tiktoken's names


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_block_runs(where, code, tiny_run, monkeypatch):
    from nanogpt.dataset.config import LOADERS
    from nanogpt.dataset.pipeline import SOURCES
    from nanogpt.text.tokenizers import TOKENIZERS
    from nanogpt.tracking.loggers import LOGGERS

    registries = [(registry, dict(registry)) for registry in (LOADERS, SOURCES, TOKENIZERS, LOGGERS)]
    monkeypatch.chdir(tiny_run.parent)
    try:
        exec(compile(code.replace(RUN_PLACEHOLDER, str(tiny_run)), where, "exec"), {"__name__": "docs"})
    finally:  # a page's example class registers itself; the other tests should not see it
        for registry, before in registries:
            registry.clear()
            registry.update(before)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}, which does not exist"
        if fragment and linked.suffix == ".md":
            prose = re.sub(r"```.*?```", "", linked.read_text(), flags=re.S)
            headings = re.findall(r"^#+ (.*)$", prose, re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: no heading for {target}"
