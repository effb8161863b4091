"""The first hour: optional parts that fail politely, refused starts that leave nothing, --help as typed.

Each missing package is tested for real, with the package hidden from import, from
importlib's find_spec and from the module listing Hydra's plugin discovery walks, as if it had
never been installed (tests/without_packages/hiding.py). The first row of each entry point
runs in a process of its own, where tests/without_packages/sitecustomize.py hides the packages
named in $NANOGPT_TEST_HIDE from start-up; the others run the command in the test process,
hiding the package around it (tests/commands.py).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .commands import packages_hidden, run_in_process
from .conftest import REPO, run_module

WITHOUT_PACKAGES = Path(__file__).parent / "without_packages"


def run_without(hidden: str, module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m module args`` where the (comma-separated) modules in hidden are not installed."""
    env = {"NANOGPT_TEST_HIDE": hidden, "PYTHONPATH": os.pathsep.join([str(WITHOUT_PACKAGES), str(REPO)])}
    return run_module(module, *args, cwd=cwd, env=env)


@dataclass(frozen=True)
class Missing:
    """A feature whose package is hidden, and what the one error line must name."""

    hidden: str  # module(s) made uninstallable
    entry: str
    args: tuple[str, ...]
    needed_for: str  # what the line says needs it
    pip_name: str  # `pip install NAME`, for an installed nanogpt
    extra: str  # `pip install -e ".[EXTRA]"`, for a clone

    @property
    def label(self) -> str:
        return f"{self.entry} {' '.join(self.args)} without {self.hidden}"


RUN = ("max_iters=1", "device=cpu", "logger=none")
MISSING = [
    Missing("tensorboard", "train", ("logger=tensorboard", *RUN[:2]), "logger=tensorboard", "tensorboard",
            "tensorboard"),
    Missing("hydra_plugins.hydra_joblib_launcher", "train", ("-m", "hydra/launcher=joblib", *RUN),
            "hydra/launcher=joblib", "hydra-joblib-launcher", "sweeps"),
    Missing("hydra_plugins.hydra_optuna_sweeper", "train", ("-m", "hydra/sweeper=optuna", *RUN),
            "hydra/sweeper=optuna", "hydra-optuna-sweeper", "sweeps"),
    Missing("hydra_plugins.hydra_submitit_launcher", "train", ("-m", "hydra/launcher=submitit_local", *RUN),
            "hydra/launcher=submitit_local", "hydra-submitit-launcher", "slurm"),
    Missing("hydra_plugins.hydra_submitit_launcher", "train", ("-m", "hydra/launcher=slurm_ddp", *RUN),
            "hydra/launcher=slurm_ddp (built on submitit_slurm)", "hydra-submitit-launcher", "slurm"),
    Missing("tiktoken", "train", ("dataset=shakespeare", *RUN), "dataset.tokenizer=gpt2", "tiktoken", "bpe"),
    Missing("tiktoken", "data", ("dataset=text", "dataset.source={corpus}", "dataset.tokenizer=gpt2"),
            "dataset.tokenizer=gpt2", "tiktoken", "bpe"),
    Missing("tiktoken", "data", ("dataset=text", "dataset.source={corpus}", "dataset.tokenizer=cl100k_base"),
            "dataset.tokenizer='cl100k_base' is not one of char, bpe, gpt2", "tiktoken", "bpe"),
    Missing("tokenizers", "data", ("dataset=text", "dataset.source={corpus}", "dataset.tokenizer=bpe",
                                   "dataset.vocab_size=300"), "dataset.tokenizer=bpe", "tokenizers", "bpe"),
    Missing("tokenizers", "train", ("dataset=text", "dataset.source={corpus}",
                                    "dataset.tokenizer={tokenizer_json}", *RUN),
            "dataset.tokenizer=", "tokenizers", "bpe"),
    Missing("datasets", "data", ("dataset=text", "dataset.source={documents}"),
            "dataset.source=", "datasets", "corpus"),
    Missing("pyarrow", "train", ("dataset=openwebtext", *RUN), "dataset.source=Skylion007/openwebtext",
            "pyarrow", "corpus"),
    Missing("huggingface_hub", "train", ("dataset=text", "dataset.source={corpus}", "model.init_from=gpt2",
                                         *RUN), "model.init_from=gpt2", "huggingface-hub", "hf"),
    Missing("safetensors", "sample", ("ckpt={hf_dir}",), "ckpt=", "safetensors", "hf"),
    Missing("huggingface_hub", "eval", ("ckpt=gpt2", "device=cpu"), "ckpt=gpt2", "huggingface-hub", "hf"),
    Missing("transformers", "export", ("ckpt={hf_dir}", "out={out}"), "exporting to Hugging Face",
            "transformers", "hf"),
    Missing("lm_eval", "eval", ("ckpt=gpt2", "task=lm_eval", "task.tasks=[arc_easy]"), "task=lm_eval",
            "lm-eval", "eval"),
    Missing("lm_eval", "train", ("eval_tasks=[lm_eval]", "tasks.lm_eval.tasks=[arc_easy]", *RUN),
            "eval_tasks=[lm_eval]", "lm-eval", "eval"),
    Missing("peft", "train", ("lora.rank=4", *RUN), "lora.rank=4", "peft", "peft"),
    Missing("peft", "export", ("ckpt={hf_dir}", "out={out}", "adapter_only=true"),
            "nanogpt.export adapter_only=true", "peft", "peft"),
    Missing("fastapi", "serve", ("ckpt={hf_dir}",), "nanogpt.serve", "fastapi", "serve"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs the rows name: a text, documents, a tokenizer.json, a Hugging Face directory."""
    root = tmp_path_factory.mktemp("inputs")
    corpus = root / "corpus.txt"
    corpus.write_text("ROMEO: I speak of love.\nJULIET: And I of the moon.\n" * 200)
    documents = root / "docs.jsonl"
    documents.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    tokenizer_json = root / "tokenizer.json"
    tokenizer_json.write_text("{}")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    return {"corpus": corpus, "documents": documents, "tokenizer_json": tokenizer_json, "hf_dir": hf_dir,
            "out": root / "exported"}


# The rows that start a real process: the first of each entry point.
REAL = {next(m.label for m in MISSING if m.entry == entry) for entry in {m.entry for m in MISSING}}


@pytest.mark.parametrize("case", MISSING, ids=[c.label for c in MISSING])
def test_a_missing_optional_package_is_one_line_before_any_work(case, files, tmp_path):
    cwd = tmp_path / "case"
    cwd.mkdir()
    args = [a.format(**files) for a in case.args]
    if case.entry in ("train", "data"):
        args.append(f"data_root={cwd / 'data'}")
    if case.label in REAL:
        result = run_without(case.hidden, f"nanogpt.{case.entry}", *args, cwd=cwd)
    else:
        result = run_in_process(f"nanogpt.{case.entry}", *args, cwd=cwd, hidden=case.hidden.split(","))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"error: {case.needed_for}") and "not installed" in line, line
    assert f"pip install {case.pip_name} " in line  # an installed nanogpt
    assert f'pip install -e ".[{case.extra}]"' in line  # a clone
    assert list(cwd.iterdir()) == [], "a refused start left something behind"  # no run dir, no data
    assert not files["out"].exists()


def test_the_hidden_packages_are_really_there_otherwise(tmp_path):
    """The rows above fail because the package is hidden: this interpreter imports them unhidden."""
    names = sorted({m.hidden for m in MISSING})
    for name in names:
        importlib.import_module(name)
    for name in names:  # hidden in this process, as the in-process rows hide them
        with packages_hidden([name]), pytest.raises(ModuleNotFoundError, match="No module named"):
            importlib.import_module(name)
    check = "import importlib, sys; [importlib.import_module(n) for n in sys.argv[1:]]; print('ok')"
    hide = {"NANOGPT_TEST_HIDE": ",".join(names),
            "PYTHONPATH": os.pathsep.join([str(WITHOUT_PACKAGES), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", check, *names], capture_output=True, text=True, timeout=300,
                           env={**os.environ, **hide})
    assert "ModuleNotFoundError: No module named" in probe.stderr


def test_every_optional_extra_is_covered():
    """A row above for each extra of pyproject.toml (read by line: Python 3.10 has no tomllib)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = {m.group(1) for m in re.finditer(r"^([\w-]+) = \[", section, flags=re.M)}
    assert len(extras) >= 6 and {m.extra for m in MISSING} == extras - {"dev"}


# ---------------------------------------------------------------- refused starts leave nothing


@pytest.mark.parametrize("args", [("device=mps",), ("max_iters=-1",), ("dataset=text",
                                  "dataset.source=/no/such/book.txt")], ids=lambda a: " ".join(a))
def test_a_refused_start_leaves_no_directory(args, tmp_path):
    earlier = tmp_path / "outputs" / "2020-01-01" / "10-00-00"
    earlier.mkdir(parents=True)
    (earlier / "last.pt").write_bytes(b"an earlier run")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for cwd in (tmp_path, fresh):
        result = run_in_process("nanogpt.train", *args, "logger=none", f"data_root={tmp_path / 'data'}",
                                cwd=cwd)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["2020-01-01"]  # no empty date folder
    assert [p.name for p in (tmp_path / "outputs" / "2020-01-01").iterdir()] == ["10-00-00"]
    assert list(fresh.iterdir()) == []  # not even outputs/: this start made it, and it is empty


def test_a_refusal_in_a_directory_someone_made_keeps_their_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    result = run_in_process("nanogpt.train", "device=mps", f"hydra.run.dir={mine}", cwd=tmp_path)
    assert result.returncode == 2
    assert (mine / "notes.txt").read_text() == "my notes"


# ---------------------------------------------------------------- --help


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_help_lists_the_users_own_config_files_and_the_command_as_typed(tmp_path):
    own = tmp_path / "my_conf"
    (own / "model").mkdir(parents=True)
    (own / "experiment").mkdir()
    (own / "model" / "mine.yaml").write_text("n_layer: 3\nn_head: 2\nn_embd: 16\nblock_size: 16\n")
    (own / "experiment" / "my_recipe.yaml").write_text("# @package _global_\nmax_iters: 7\n")
    (own / "logger").mkdir()
    (own / "logger" / "quiet.yaml").write_text("name: none\n")

    by_dir = run_in_process("nanogpt.train", "--config-dir", str(own), "model=mine", "--help", cwd=tmp_path)
    by_path = run_in_process("nanogpt.train", f"hydra.searchpath=[file://{own}]", "--help", cwd=tmp_path)
    for result in (by_dir, by_path):
        assert result.returncode == 0, result.stderr
        groups = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines()
                      if line.startswith("  ") and ": " in line and not line.startswith("   "))
        assert "mine" in groups["model"].split(", ") and "small" in groups["model"].split(", ")
        assert "quiet" in groups["logger"].split(", ")
        assert "my_recipe" in groups["+experiment"].split(", ")
        assert "shakespeare_char" in groups["+experiment"].split(", ")
        assert result.stdout.startswith("python -m nanogpt.train [group=option ...]")
    assert "  model.n_layer: int = 3" in by_dir.stdout  # model=mine composed from the user's folder

    # The installed command, as pip writes it: the script's name is what the user typed.
    script = tmp_path / "bin" / "nanogpt-train"
    script.parent.mkdir()
    script.write_text("import sys\nfrom nanogpt.train import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    typed = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout.startswith("nanogpt-train [group=option ...]")


def test_help_groups_come_from_hydras_repository_of_train_options():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from nanogpt.cli.entry import register_configs
    from nanogpt.cli.help import group_options
    from nanogpt.cli.paths import CONFIG_DIR
    from nanogpt.training.config import TrainConfig

    register_configs("train", TrainConfig)  # as nanogpt.train registers its own when it starts
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        options = group_options(["model", "dataset", "seed"], [])
        assert GlobalHydra.instance().is_initialized()
    assert options["model"] == sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    assert "seed" not in options  # a key, not a group
    assert "shakespeare_char" in options["experiment"]

