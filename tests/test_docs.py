"""Every command and Python block in README.md, docs/ and experiments/ still works, and every link.

tests/doc_pages.py reads the pages; tests/test_doc_commands.py runs their commands. Here:

- each ``python -m nanogpt.X`` / ``nanogpt-X`` / ``torchrun ... -m nanogpt.X`` of a Hydra command is
  composed in-process by Hydra (sweeps reduced to their first value, ``-m`` dropped) and turned into
  the command's schema with the same ``to_dataclass`` the command uses, so a renamed key fails the
  quick tier, not only the slow one that runs the commands;
- torchrun's own options go through torchrun's parser and launch configuration, which must not warn;
- every ```python block runs against the pages' run (conftest's docs_run; on docs/finetuning.md its
  LoRA finetune) where it names the placeholder run directory;
- every relative link points at a file and, where it names one, a heading that exists.
"""

from __future__ import annotations

import logging
import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from nanogpt.cli.entry import to_dataclass
from nanogpt.cli.overrides import parse_overrides
from nanogpt.cli.paths import CONFIG_DIR

from .conftest import register_commands
from .doc_pages import PAGES, REPO, Command, page_commands
from .test_doc_commands import FINETUNED_PAGES

RUN_PLACEHOLDER = "outputs/2026-11-22/10-31-07"  # the run directory the pages' Python blocks load
# Hydra's own flags that take a value (the value is not an override).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--shell-completion", "-sc"}
FLAGS = {"-m", "--multirun", "--help", "-h"}


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


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_block_runs(where, code, docs_run, finetuned_run, monkeypatch):
    from nanogpt.dataset.config import LOADERS
    from nanogpt.dataset.pipeline import SOURCES
    from nanogpt.text.tokenizers import TOKENIZERS
    from nanogpt.tracking.loggers import LOGGERS

    registries = [(registry, dict(registry)) for registry in (LOADERS, SOURCES, TOKENIZERS, LOGGERS)]
    run = finetuned_run if where.split(":")[0] in FINETUNED_PAGES else docs_run
    monkeypatch.chdir(run.parent)
    try:
        exec(compile(code.replace(RUN_PLACEHOLDER, str(run)), where, "exec"), {"__name__": "docs"})
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
