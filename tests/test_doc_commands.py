"""Every command the pages tell a reader to run on a CPU runs, as the page writes it, and succeeds.

tests/doc_pages.py reads the pages. Here each ```bash block runs line by line, in order, in a
folder of its own, as a reader pasting it into a shell runs it; each command of the text (a code
span) runs alone. A line the page marks ``not run by the tests: REASON`` is left out (tests/test_docs.py
composes it); every other line must run, and each command on it must succeed.

What a page leaves to its reader is filled with real things made here (World):

- the runs it names (``outputs/2026-11-22/10-31-07``, ``RUN``, ``RUN_DIR``, ``BASE``, ...) are copies of
  a real tiny run (conftest's docs_run; on docs/finetuning.md its LoRA finetune) at those very paths,
  and ``outputs/sweeps/2026-11-22_10-31-07`` a real sweep;
- the files it names (``book.txt``, ``prompt.txt``, ``out-shakespeare-char/``, ``hf/``, ...) are written
  there; ``/path/to/...``, ``/tmp/...`` and ``/scratch/...`` are folders inside it;
- Tiny Shakespeare is the offline copy (``NANOGPT_SHAKESPEARE_SOURCE``), GPT-2's BPE a seeded tiktoken
  cache, Hugging Face is offline, and ``http://127.0.0.1:8000`` is the server the pages' first
  ``serve`` command starts (one process for every page's clients).

A command that would take minutes is shortened by overrides appended after the page's own words
(``quick``: two steps, a smaller model, a few tokens), never by changing them; a run the page gives no
directory gets one of its own (Hydra's timestamps change once a second, and these runs are quicker).
torchrun's "try it on a CPU" line runs exactly as written, with ``max_iters=2`` after it.

Our commands run in this process (tests/commands.py:run_in_process) wherever no process boundary
matters (``task=lm_eval`` too); torchrun, the servers, curl, the ``lm_eval`` program, W&B runs and
other programs run as real processes.

Together they take minutes, so they are the slow tier, in three groups (test classes) that
pytest-xdist hands to workers of their own; the quick tier checks that every line is run or marked,
and tests/test_docs.py composes every command against its schema.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from .commands import run_in_process
from .conftest import DOCS_RUN, SHAKESPEARE, TINY_RUN
from .doc_pages import (
    ENV_ASSIGNMENT,
    PAGES,
    REPO,
    Command,
    Line,
    bash_blocks,
    command_of,
    commands_of,
    inline_lines,
    segments,
    substituted,
)
from .server_process import ServerProcess
from .test_eval_harness import offline_env, offline_in_this_process

PAGE_URL = "http://127.0.0.1:8000"  # where the pages' clients find the server
RUNS = ("outputs/2026-11-22/10-31-07", "outputs/DATE/TIME", "RUN", "RUN_DIR", "RUN_OR_FILE", "RUN_OR_SWEEP")
SWEEP = "outputs/sweeps/2026-11-22_10-31-07"
FINETUNED_PAGES = ("docs/finetuning.md",)  # where RUN and the dated run are a finetuned model
ABSOLUTE = re.compile(r"(?<![\w.])/(path/to|tmp|scratch)/")  # the pages' absolute paths: the scene's folders
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
SHELL_VARIABLES = {"SLURM_JOB_ID": "4242"}  # what the reader's shell has set where the page expects it

# ---------------------------------------------------------------------------------------------------
# Quick: what is appended to a command so that it takes seconds. The page's words stay in front.

TRAINING = ["max_iters=2", "eval_interval=2", "eval_iters=1", "log_interval=1", "batch_size=2",
            "sample_tokens=4"]
SMALL_MODEL = ["model.n_layer=1", "model.n_head=1", "model.n_embd=16"]  # not where weights are read in
DOCS_ITERS = int(next(a for a in reversed(DOCS_RUN) if a.startswith("max_iters=")).split("=")[1])
RESUMED = [f"max_iters={DOCS_ITERS + 2}", "eval_interval=2", "eval_iters=1", "sample_tokens=4"]
TRIED_ITERS = 2  # torchrun's "try it on a CPU"; the torchrun resume after it goes 2 steps further
QUICK = {
    "sample": ["num_tokens=8"],
    "chat": ["max_new_tokens=8"],
    "bench": ["bench.warmup_steps=1", "bench.train_steps=2", "bench.gen_tokens=4", *SMALL_MODEL,
              "model.block_size=64"],
    "benchmarks.serving": ["--clients", "2", "--requests-each", "1", "--max-tokens", "8", "--probes", "1",
                           "--mixup-requests", "4", "--mixup-clients", "2"],
    "experiments.make_reverse_task": ["--train", "64", "--heldout", "4"],
}
# W&B's runs (online, or a project of one's own) run in processes of their own: W&B leaves its
# service's threads behind. task=lm_eval runs in this one, with the offline settings datasets read at import.
OWN_PROCESS = re.compile(r"logger\.(mode=online|project=)")


def keys(args: list[str]) -> set[str]:
    return {a.split("=")[0].lstrip("+~") for a in args if "=" in a and not a.startswith("-")}


def recipes(args: list[str]) -> str:
    """The text of the recipes (+experiment=NAME) a command names."""
    paths = [REPO / "experiments" / f"{a.split('=', 1)[1]}.yaml" for a in args
             if a.startswith("+experiment=")]
    return "".join(path.read_text() for path in paths if path.is_file())


def quick(command: Command, number: int) -> list[str]:
    """What goes after the page's words to make the command quick, and its run a directory of its own."""
    args, module = command.args, command.module
    if module == "experiments.make_reverse_task" and "--score" in args:
        return []
    if module not in QUICK and any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return []  # --help, --cfg, -sc: nothing is computed
    if command.torchrun is not None and "try it" in command.line.text:
        return [f"max_iters={TRIED_ITERS}"]
    if command.torchrun is not None and "resume" in keys(args):
        return [f"max_iters={TRIED_ITERS + 2}"]
    if module == "train" and "resume" in keys(args):
        return RESUMED
    if module == "train":
        weights_read_in = "model.init_from" in keys(args) or "init_from:" in recipes(args)
        extra = [*TRAINING, *([] if weights_read_in else SMALL_MODEL)]
        if not any(k.startswith("logger") for k in keys(args)):
            extra.append("logger=none")  # W&B's service costs more than these runs
        if "-m" in args:
            extra += [f"hydra.sweep.dir=outputs/sweeps/sweep{number}"] * ("hydra.sweep.dir" not in keys(args))
            extra += ["hydra.sweeper.n_trials=2"] * ("lr_search" in " ".join(args))  # Optuna's trials
        elif command.torchrun is None and not keys(args) & {"hydra.run.dir", "resume"} \
                and not re.search(r"^hydra:\n  run:", recipes(args), re.M):  # a recipe's own directory stays
            extra.append(f"hydra.run.dir=outputs/run{number}")
        return extra
    extra = list(QUICK.get(module, []))
    if module == "bench":
        extra.append(f"hydra.run.dir=outputs/bench/run{number}")
    if module == "eval" and "task=lm_eval" in args:
        extra.append("task.limit=4")
    return extra


# ---------------------------------------------------------------------------------------------------
# Scenes: what one test runs.

@dataclass
class Scene:
    """A block's lines, in order, or one command of the text."""

    where: str
    page: str
    lines: list[Line]

    def __str__(self) -> str:
        return self.where


def normal(line: Line) -> tuple[str, ...]:
    """The line's words, its comment left out."""
    return tuple(shlex.split(line.text, comments=True))


def is_torchrun(line: Line) -> bool:
    return "torchrun" in normal(line)


def stands_alone(line: Line) -> bool:
    """A line whose effect no later line can name: run once, wherever the pages write it."""
    words = normal(line)
    return not ({"&&", "|", "export"} & set(words)) and "nanogpt.serve" not in words \
        and not any(w.startswith(("hydra.run.dir=", "out=")) for w in words)


def runnable(page: Path) -> list[list[Line]]:
    """The page's blocks, and its commands in the text each alone, without what is marked or only named."""
    parts = [[line for line in block if not line.not_run] for block in bash_blocks(page)]
    return parts + [[line] for line in inline_lines(page) if not line.not_run and not line.named]


def page_scenes() -> list[Scene]:
    """Every scene of every page but its torchrun lines; a line written as one run before (stands_alone)
    is not run again.
    """
    scenes, seen = [], set()
    for page in PAGES:
        name = str(page.relative_to(REPO))
        for lines in runnable(page):
            kept = []
            for line in lines:
                key = normal(line), name in FINETUNED_PAGES  # the same words may name another run
                if not is_torchrun(line) and not (stands_alone(line) and key in seen):
                    seen.add(key)
                    kept.append(line)
            if kept:
                scenes.append(Scene(kept[0].block or kept[0].where, name, kept))
    return scenes


SCENES = page_scenes()
TORCHRUN_LINES = [line for page in PAGES for lines in runnable(page) for line in lines if is_torchrun(line)]


# ---------------------------------------------------------------------------------------------------
# The world: what the pages name, made once per module and copied into each scene's folder.

BOOK = "".join(f"{who}: What light through yonder window breaks? It is the {what}.\n"
               for who in ("ROMEO", "JULIET", "NURSE", "FRIAR")
               for what in ("east", "moon", "sun", "day")) * 40


def write_task_file(folder: Path, name: str) -> None:
    """An lm-eval multiple-choice task over a local JSONL file, for task.include_path=FOLDER."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": f"{who}: It is the", "choices": [" east.", " moon.", " dog."], "answer": i % 2}
            for i, who in enumerate(("ROMEO", "JULIET", "NURSE", "FRIAR"))]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\noutput_type: multiple_choice\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {folder / name}.jsonl\n"
        "training_split: null\nvalidation_split: validation\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")


def make_template(root: Path) -> Path:
    """Every file the pages name and do not make themselves (the runs go in per page: World.scene)."""
    import lm_eval
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from nanogpt.text.tokenizers import GPT2_TOKENIZER

    from .hellaswag_examples import HAND_WRITTEN, generated, write_jsonl
    from .test_eval_tasks import BPE_MODEL
    from .test_load import VOCABULARY, write_meta_pkl, write_nanogpt_checkpoint, write_our_checkpoint

    world = root / "template"
    for name in ("book.txt", "path/to/book.txt", "held_out.txt", "tmp/text400.txt"):
        (world / name).parent.mkdir(parents=True, exist_ok=True)
        (world / name).write_text(BOOK)
    (world / "prompt.txt").write_text("ROMEO:")
    (world / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in BOOK.splitlines()))
    (world / "path/to/owt").mkdir(parents=True)
    (world / "path/to/owt/docs.jsonl").write_text("".join(
        json.dumps({"text": f"{line} ({n})"}) + "\n" for n in range(3) for line in BOOK.splitlines()))
    for name in ("input.txt", "path/to/tinyshakespeare.txt"):
        (world / name).symlink_to(SHAKESPEARE)
    for folder in ("docs", "experiments"):  # as in a clone
        (world / folder).symlink_to(REPO / folder)

    def short(examples):  # endings that a character model's 64-token block holds, as lm-eval requires
        return [e for e in examples if max(map(len, e["endings"])) < 60][:8]

    write_jsonl(world / "my_examples.jsonl", short(HAND_WRITTEN))
    for name in ("hs120.jsonl", "hs200.jsonl"):
        write_jsonl(world / name, short(generated(40)))
    write_task_file(world / "my_tasks", "my_task")
    hellaswag_yaml = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (world / "tasks").mkdir()
    (world / "tasks" / "hellaswag_local.yaml").write_text(
        f"include: {hellaswag_yaml}\ntask: hellaswag_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {world / 'hs120.jsonl'}\n"
        "training_split: null\nvalidation_split: validation\n")
    # karpathy/nanoGPT's: out_dirs, the meta.pkl where its sample.py finds it, a prepared data folder
    for out in ("out-shakespeare-char", "out-cpu"):
        write_nanogpt_checkpoint(world / out, block_size=64)
    write_meta_pkl(world / "data" / "shakespeare_char")
    prepared = world / "nanoGPT" / "data" / "shakespeare_char"
    write_meta_pkl(prepared)
    text = SHAKESPEARE.read_text()[:20_000]
    ids = np.array([VOCABULARY.index(c) for c in text if c in VOCABULARY], np.uint16)
    ids[:18_000].tofile(prepared / "train.bin")
    ids[18_000:].tofile(prepared / "val.bin")
    # a tokenizer.json of one's own
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(BOOK.splitlines(),
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tokenizer.save(str(world / "path/to/tokenizer.json"))
    # a Hugging Face GPT-2 directory (GPT-2's vocabulary and 1024 positions), as nanogpt.export writes one
    write_our_checkpoint(root / "bpe_run" / "best.pt", replace(BPE_MODEL, block_size=1024), GPT2_TOKENIZER)
    exported = run_in_process("nanogpt.export", f"ckpt={root / 'bpe_run'}", f"out={world / 'hf'}", cwd=root)
    assert exported.returncode == 0, exported.stderr
    for name in ("HF_EXPORT", "path/to/hf_dir"):
        shutil.copytree(world / "hf", world / name)
    return world


class World:
    """The template of every scene's folder, the runs each page's placeholders name, the environment."""

    def __init__(self, root: Path, run: Path, bpe_cache: Path, request):
        self.root, self.template = root, make_template(root)
        self.run, self.request = run, request  # the finetuned run and the sweep are made when first named
        self.env = {"NANOGPT_SHAKESPEARE_SOURCE": str(SHAKESPEARE), "TIKTOKEN_CACHE_DIR": str(bpe_cache),
                    "NANOGPT_DATA_ROOT": str(root / "data_root"), **offline_env(root),
                    "TRANSFORMERS_OFFLINE": "1"}

    def scene(self, page: str, folder: Path, lines: list[Line] = ()) -> Path:
        """A folder for a scene of page: the template, with the runs the page's placeholders name."""
        work = folder / "work"
        shutil.copytree(self.template, work, symlinks=True)
        run = self.request.getfixturevalue("finetuned_run") if page in FINETUNED_PAGES else self.run
        for name in RUNS:
            shutil.copytree(run, work / name)
        shutil.copytree(self.run, work / "BASE")
        if any(SWEEP in line.text for line in lines):
            shutil.copytree(self.request.getfixturevalue("docs_sweep"), work / SWEEP)
        (folder / "shared" / "data").mkdir(parents=True)  # ../shared/data/..., as beside a clone
        (folder / "shared" / "data" / "tinyshakespeare.txt").symlink_to(SHAKESPEARE)
        return work


@pytest.fixture(scope="module")
def docs_sweep(tmp_path_factory) -> Path:
    """A real sweep directory of two tiny jobs: the pages' outputs/sweeps/2026-11-22_10-31-07."""
    root = tmp_path_factory.mktemp("docs_sweep")
    corpus = root / "corpus.txt"
    corpus.write_text(BOOK)
    result = run_in_process("nanogpt.train", "-m", *TINY_RUN, "dataset=text", f"dataset.source={corpus}",
                            f"data_root={root / 'data'}", "max_iters=2", "eval_interval=2",
                            "optimizer.lr=1e-3,3e-3", "hydra.sweep.dir=sweep", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "sweep"


@pytest.fixture(scope="module")
def world(tmp_path_factory, bpe_cache, docs_run, request) -> World:
    return World(tmp_path_factory.mktemp("doc_world"), docs_run, bpe_cache, request)


# ---------------------------------------------------------------------------------------------------
# The shell: the few forms of shell the pages use, each command run as bash would run it.

def program_of(line: Line, words: list[str]) -> tuple[str, list[str], dict[str, str], Command | None]:
    """What runs one simple command; its words (VAR=value and time in front left out); their variables.

    The kind is "ours" (a command of ours, or a script of the clone's, run in this process), "export",
    "eval", "python -c", "printf", "curl", "lm_eval" or "mktemp"; "" for a program the tests do not run.
    """
    env, words = {}, list(words)
    while words and ENV_ASSIGNMENT.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    while words and words[0] in ("time", "/usr/bin/time"):
        words = words[2:] if words[1:2] == ["-v"] else words[1:]
    command = command_of(line, words)
    if command is None and words[:1] in (["python"], ["python3"]) and words[1].startswith("experiments/"):
        command = Command(line, Path(words[1]).with_suffix("").as_posix().replace("/", "."), words[2:])
    if command is not None:
        return "ours", words, env, command
    if words[:1] in (["python"], ["python3"]) and words[1:2] == ["-c"]:
        return "python -c", words, env, None
    known = ("export", "eval", "printf", "curl", "lm_eval", "mktemp")
    return (words[0] if words and words[0] in known else ""), words, env, None


def main_serve_command() -> Command:
    """The first serve command of the pages: the server every page's clients talk to."""
    return next(c for page in PAGES for lines in runnable(page) for line in lines for c in commands_of(line)
                if c.module == "serve" and not any(a.startswith("-") for a in c.args))


def effective(args: list[str]) -> frozenset:
    """The settings a serve command ends up with: ServerProcess's own first, the page's after them."""
    settings = {"port": "0", "device": "cpu", "device.threads": "1"}
    settings.update(a.split("=", 1) for a in args)
    return frozenset(settings.items())


class Servers:
    """The pages' main server (main_serve_command): started once, on demand, for every page's clients."""

    def __init__(self, world: World, folder: Path):
        self.world, self.folder, self.process = world, folder, None
        self.command = main_serve_command()

    def url(self) -> str:
        if self.process is None:
            work = self.world.scene(self.command.where.split(":")[0], self.folder)
            self.process = ServerProcess(*self.command.args, cwd=work, env=self.world.env)
        return self.process.url

    def stop(self) -> None:
        if self.process is not None:
            assert self.process.stop() == 0, self.process.stderr


@pytest.fixture(scope="module")
def servers(world, tmp_path_factory):
    started = Servers(world, tmp_path_factory.mktemp("main_server"))
    yield started
    started.stop()


class Shell:
    """Runs a scene's lines in its folder as bash would: &&, |, $(...), $VAR, VAR=value, export."""

    def __init__(self, work: Path, world: World, servers: Servers):
        self.work, self.world, self.servers = work, world, servers
        self.env: dict[str, str] = {}  # what the scene's lines export
        self.own_servers: list[ServerProcess] = []  # servers its lines started, the main one aside
        self.commands = 0

    def run(self, line: Line) -> None:
        text, inner = substituted(line.text)
        for pipeline in split(shlex.split(text, comments=True), "&&"):
            piped = ""
            for words in split(pipeline, "|"):
                piped = self.simple(line, [self.expand(line, word, inner) for word in words], piped)

    def expand(self, line: Line, word: str, inner: list[str]) -> str:
        """$VAR by its value, $(...) by what it prints, the pages' absolute paths by folders of the scene."""
        values = {**SHELL_VARIABLES, **self.world.env, **self.env, "PWD": str(self.work)}
        for name in VARIABLE.findall(word):
            assert name in values, f"{line}: ${name} is set by nothing the tests know"
        word = VARIABLE.sub(lambda m: values[m.group(1)], word)
        for index, command in enumerate(inner):
            if f"@SUBSTITUTED{index}@" in word:
                printed = self.simple(line, [self.expand(line, w, inner) for w in shlex.split(command)], "")
                word = word.replace(f"@SUBSTITUTED{index}@", printed.rstrip("\n"))
        return ABSOLUTE.sub(lambda m: f"{self.work}/{m.group(1)}/", word)

    def simple(self, line: Line, words: list[str], stdin: str) -> str:
        """Run one simple command; what it printed on stdout (for a pipe or a $(...))."""
        kind, words, env, command = program_of(line, words)
        if kind == "ours":
            return self.ours(line, command, env, stdin)
        if kind == "export" or not words:  # VAR=value alone sets it for the shell too
            self.env.update(env)
            self.env.update(word.split("=", 1) for word in words[1:])
            return ""
        if kind == "mktemp":  # a folder of the scene's, not of the machine's /tmp
            assert words[1:] == ["-d"], f"{line}: {' '.join(words)}"
            return tempfile.mkdtemp(dir=self.work)
        if kind == "eval":  # a script for the reader's shell: bash must take it
            return self.process(line, ["bash", "-c", 'eval "$1"', "bash", " ".join(words[1:])], env, stdin)
        if kind == "python -c":
            return self.process(line, [sys.executable, *words[1:]], env, stdin)
        if kind == "curl":
            return self.curl(line, words, env)
        if kind == "printf":
            return self.process(line, words, env, stdin)
        if kind == "lm_eval":  # its console script, a process of its own: in this one, a later fork hung
            return self.process(line, [w.replace(PAGE_URL, self.url()) for w in words], env, stdin)
        raise AssertionError(f"{line}: the tests do not know how to run {words[0]}; mark the line "
                             "'# not run by the tests: WHY' or teach tests/test_doc_commands.py")

    def ours(self, line: Line, command: Command, env: dict, stdin: str) -> str:
        self.commands += 1
        args = [a.replace(PAGE_URL, self.url()) if command.module == "benchmarks.serving" else a
                for a in [*command.args, *quick(command, self.commands)]]
        module = command.module if command.module.startswith("experiments.") else f"nanogpt.{command.module}"
        if command.module == "serve" and not any(a.startswith("-") for a in args):
            if effective(args) == effective(self.servers.command.args):
                self.servers.url()  # the main server, up from now on if it was not already
            else:
                self.own_servers.append(ServerProcess(*args, cwd=self.work,
                                                      env={**self.world.env, **self.env, **env}))
            return ""
        if command.torchrun is not None:
            options = command.torchrun[:command.torchrun.index(module) - 1]
            return self.process(line, [sys.executable, "-m", "torch.distributed.run", *options, "-m", module,
                                       *args], env, stdin)
        if OWN_PROCESS.search(" ".join(args)):
            return self.process(line, [sys.executable, "-m", module, *args], env, stdin)
        return self.in_process(line, module, args, env, stdin)

    def in_process(self, line: Line, module: str, args: list[str], env: dict, stdin: str) -> str:
        with pytest.MonkeyPatch.context() as patch:
            offline_in_this_process(self.world.root, patch)  # as datasets would have read world.env
            if "task=lm_eval" in args:
                lm_eval_tasks_indexed_once(patch)
            result = run_in_process(module, *args, cwd=self.work, env={**self.world.env, **self.env, **env},
                                    input=stdin)
        assert result.returncode == 0, f"{line}: {' '.join([module, *args])} exited {result.returncode}:\n" \
                                       f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    def url(self) -> str:
        """Where the scene's clients find a server: the one it started, else the pages' main one."""
        return self.own_servers[-1].url if self.own_servers else self.servers.url()

    def curl(self, line: Line, words: list[str], env: dict) -> str:
        """Run curl as written, against the scene's server; an HTTP error fails it (--fail-with-body)."""
        printed = self.process(line, [*(w.replace(PAGE_URL, self.url()) for w in words), "--fail-with-body",
                                      "-sS"], env, "")
        if "-N" not in words:  # not a stream: one JSON body, not an error
            assert "error" not in json.loads(printed), f"{line}: {printed}"
        return printed

    def process(self, line: Line, words: list[str], env: dict, stdin: str) -> str:
        full_env = {**os.environ, **self.world.env, **self.env, **env, "PYTHONUNBUFFERED": "1"}
        full_env.pop("HYDRA_FULL_ERROR", None)
        result = subprocess.run(words, cwd=self.work, env=full_env, input=stdin, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{line}: {' '.join(words)} exited {result.returncode}:\n" \
                                       f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    def close(self) -> None:
        for server in self.own_servers:
            assert server.stop() == 0, server.stderr


_INDEXED: dict = {}


def lm_eval_tasks_indexed_once(patch: pytest.MonkeyPatch) -> None:
    """lm-eval's index of its own task folder (17 s of reading YAML files each run) read once per process.

    Its TaskManager indexes each folder it is given in turn, a later folder's task replacing an
    earlier's of the same name; the folder of lm-eval's own tasks, which nothing changes, is read the
    first time only, and every other folder (the pages' task files) as lm-eval reads it.
    """
    from lm_eval.tasks import _index

    build, own = _index.TaskIndex.build, Path(_index.__file__).parent

    def build_once(paths, *, resolve_includes=True):
        index = {}
        for root in paths:
            if Path(root) == own and resolve_includes:
                if "own" not in _INDEXED:
                    _INDEXED["own"] = build([root])
                part = _INDEXED["own"]
            else:
                part = build([root], resolve_includes=resolve_includes)
            for name, entry in part.items():
                if name in index:
                    _index.log.warning("Task '%s' from %s overrides existing task from %s",
                                       name, entry.yaml_path, index[name].yaml_path)
                index[name] = entry
        return index

    patch.setattr(_index.TaskIndex, "build", staticmethod(build_once))


def split(words: list[str], operator: str) -> list[list[str]]:
    parts = [[]]
    for word in words:
        if word == operator:
            parts.append([])
        else:
            parts[-1].append(word)
    return parts


# ---------------------------------------------------------------------------------------------------

def test_every_line_the_pages_show_is_run_or_marked():
    """Each command on every line not marked 'not run by the tests' is one the shell above runs."""
    unknown = [f"{line}: {' '.join(words)}" for page in PAGES for lines in runnable(page) for line in lines
               for words in segments(line.text) if words and not program_of(line, words)[0]]
    assert not unknown, "lines neither run nor marked 'not run by the tests: WHY':\n" + "\n".join(unknown)
    run = {line.where for scene in SCENES for line in scene.lines} | {line.where for line in TORCHRUN_LINES}
    assert len(run) > 120


def run_scene(scene: Scene, world: World, servers: Servers, folder: Path) -> None:
    shell = Shell(world.scene(scene.page, folder, scene.lines), world, servers)
    try:
        for line in scene.lines:
            shell.run(line)
    finally:
        shell.close()


# Two groups of scenes, every other one each (a block's cost is no guide to its neighbour's), so
# that two workers share them; a worker that runs both shares one world between them.
@pytest.mark.slow  # minutes together
class TestTheScenesOfEveryOtherBlock:
    @pytest.mark.parametrize("scene", SCENES[0::2], ids=str)
    def test_the_pages_commands_run(self, scene, world, servers, tmp_path):
        run_scene(scene, world, servers, tmp_path)


@pytest.mark.slow  # minutes together
class TestTheScenesBetweenThem:
    @pytest.mark.parametrize("scene", SCENES[1::2], ids=str)
    def test_the_pages_commands_run(self, scene, world, servers, tmp_path):
        run_scene(scene, world, servers, tmp_path)


def server_blocks() -> list[tuple[str, str]]:
    """(page:line, code) of every ```python server block: client code for the server the pages start."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```python server\n(.*?)```", text, re.S):
            where = f"{page.relative_to(REPO)}:{text[:match.start()].count(chr(10)) + 1}"
            blocks.append((where, match.group(1)))
    return blocks


@pytest.mark.slow  # docs/serving.md's: a manual's page
@pytest.mark.parametrize("where,code", server_blocks(), ids=[where for where, _ in server_blocks()])
def test_the_pages_client_code_runs_against_their_server(where, code, servers, capsys):
    assert PAGE_URL in code
    exec(compile(code.replace(PAGE_URL, servers.url()), where, "exec"), {"__name__": "docs"})
    assert capsys.readouterr().out.strip()


@pytest.mark.slow  # torchrun jobs
def test_the_torchrun_lines_run(world, servers, tmp_path):
    """Each torchrun line of the pages, in the pages' order, in a folder of its own.

    A line that resumes a run resumes the 2-process run the line before it made ("try it on a CPU").
    """
    assert TORCHRUN_LINES
    made = None
    for number, line in enumerate(TORCHRUN_LINES):
        work = world.scene(line.where.split(":")[0], tmp_path / str(number))
        resumed = [c.args for c in commands_of(line) if "resume" in keys(c.args)]
        for args in resumed:
            assert made, f"{line}: resumes a run, and no line before it made one"
            target = work / next(a for a in args if a.startswith("resume=")).split("=", 1)[1]
            shutil.rmtree(target)
            shutil.copytree(made, target)
        before = set((work / "outputs").rglob("last.pt"))
        Shell(work, world, servers).run(line)
        after = set((work / "outputs").rglob("last.pt")) - before
        if after and not resumed:
            (made,) = {path.parent for path in after}
