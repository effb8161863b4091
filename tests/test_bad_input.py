"""Every kind of bad input, through every entry point, fails the same way.

One table of (area, entry point, arguments, expected words). Each row runs the
command (``python -m nanogpt.<entry>``) and must end with exit status 2, exactly one
``error:`` line on stderr naming the key or file and what would work, no
traceback, no run directory left behind, and never code run from a checkpoint.
The first row of each entry point starts a real process; the others run the same
main() in the test process (tests/commands.py), since a process would spend most
of its life starting.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .commands import run_in_process
from .conftest import copy_of_trained_run, run_module


@dataclass(frozen=True)
class Case:
    """One bad input: where it is given and what the one error line must say."""

    area: str  # config | data | checkpoint | device | prompt
    entry: str  # train | sample | data
    args: tuple[str, ...]
    expected: str

    @property
    def label(self) -> str:
        """A readable test id."""
        return f"{self.area}: {self.entry} {' '.join(self.args)}"


# {name} fields are filled in with files the `world` fixture makes.
CASES = [
    # config
    Case("config", "train", ("max_iters=-1",), "max_iters=-1 must be >= 0"),
    Case("config", "train", ("eval_interval=0",), "eval_interval=0 must be at least 1"),
    Case("config", "train", ("optimizer=sgd",), "optimizer=sgd is not an option; choose one of: adamw"),
    Case("config", "train", ("+experiment=nope",), "experiment=nope is not an option"),
    Case("config", "train", ("model.n_layer=[",), "quote values"),
    Case("config", "sample", ("ckpt={run}", "nosuch=1"), "unknown key 'nosuch'"),
    Case("config", "sample", ("ckpt={run}", "top_p=2"), "top_p=2.0 must be in (0, 1]"),
    Case("config", "sample", ("ckpt={run}", "num_samples=0"), "num_samples >= 1"),
    Case("config", "data", ("dataset=nope",), "dataset=nope is not an option"),
    Case("config", "train", ("logger=slack",), "logger=slack is not an option"),
    Case("config", "train", ("logger.mode=sometimes",), "logger.mode='sometimes' is not one of"),
    Case("config", "train", ("dataset.tokenizer=bert",),
         "dataset.tokenizer='bert' is not one of char, bpe, gpt2"),
    Case("config", "train", ("hydra/launcher=nope",), "hydra/launcher=nope is not an option"),
    Case("config", "train", ("-m", "--cfg", "job", "optimizer.lr=1e-3,1e-4"),
         "-m and --cfg cannot be combined (Hydra takes one of -m, --cfg, --info)"),
    Case("config", "train", ("model.n_head=0",), "model.n_head=0 must be at least 1"),
    Case("config", "train", ("model.activation=swish",),
         "model.activation='swish' is not one of gelu, relu2"),
    Case("config", "train", ("model.position_encoding=rope", "model.n_embd=12", "model.n_head=4"),
         "model.position_encoding=rope needs an even head size"),
    Case("config", "train", ("model.init_from=gpt2", "model.norm=rmsnorm"),
         "model.init_from=gpt2 loads GPT-2's architecture; drop model.norm=rmsnorm"),
    # data
    Case("data", "train", ("dataset=text", "dataset.source={empty_dir}"), "a directory with no .txt files"),
    Case("data", "train", ("dataset=text", "dataset.source={corpus}", f"dataset.sha256={'0' * 64}"),
         "expected 0000"),
    Case("data", "train", ("dataset=text", "dataset.source={binary}"), "is not UTF-8 text"),
    Case("data", "train", ("dataset.source={url}/missing.txt",), "(HTTP 404)"),
    Case("data", "train", ("dataset=text", "dataset.source={corpus}", "data_root={corpus}"),
         "cannot create"),
    Case("data", "data", ("dataset=text", "dataset.source=/no/such/corpus.txt"),
         "dataset.source /no/such/corpus.txt does not exist"),
    # checkpoint
    Case("checkpoint", "sample", ("ckpt={evil}",), "was refused (loading it could run code)"),
    Case("checkpoint", "sample", ("ckpt={truncated}",), "is truncated, corrupted"),
    Case("checkpoint", "sample", ("ckpt={corpus}",), "is truncated, corrupted or not a torch.save file"),
    Case("checkpoint", "sample", ("ckpt={plain}",), "is not a nanogpt checkpoint"),
    Case("checkpoint", "sample", ("ckpt={empty_dir}",), "holds no best.pt or last.pt"),
    Case("checkpoint", "sample", (), "no checkpoint found under"),
    Case("checkpoint", "train", ("resume={evil}",), "was refused (loading it could run code)"),
    Case("checkpoint", "train", ("resume={truncated}",), "is truncated, corrupted"),
    Case("checkpoint", "train", ("resume={run}/best.pt",), "no training state"),
    Case("checkpoint", "train", ("resume={empty_dir}",), "holds no last.pt"),
    Case("checkpoint", "train", ("resume=/no/such/run",), "resume=/no/such/run does not exist"),
    Case("checkpoint", "train", ("resume={run}", "model.n_embd=64"), "resume: model.n_embd=64 would change"),
    Case("checkpoint", "train", ("resume={run}", "-m"), "cannot be combined with --multirun"),
    Case("checkpoint", "train", ("resume={run}", "hydra.run.dir={empty_dir}"), "drop hydra.run.dir"),
    Case("checkpoint", "train", ("dataset=text", "dataset.source={corpus}", "model.init_from={empty_dir}"),
         "holds no best.pt or last.pt (our runs), no ckpt.pt (nanoGPT's out_dir) and no config.json"),
    Case("checkpoint", "sample", ("ckpt=gpt3",), "ckpt=gpt3 does not exist and is no known model name"),
    Case("checkpoint", "eval", ("ckpt={evil}",), "was refused (loading it could run code)"),
    Case("checkpoint", "eval", ("ckpt={empty_dir}",), "holds no best.pt or last.pt"),
    Case("config", "eval", ("ckpt={run}", "split=test"), "split='test' is not one of val, train"),
    Case("config", "eval", ("ckpt={run}", "dataset.name=x"), "dataset.name: no dataset is chosen"),
    Case("checkpoint", "export", ("ckpt=/no/such.pt", "out={empty_dir}/exported"),
         "ckpt=/no/such.pt does not exist"),
    Case("checkpoint", "report", ("/no/such/run",), "/no/such/run does not exist"),
    # device
    Case("device", "train", ("device.name=tpu",), "device='tpu' is not a device"),
    Case("device", "train", ("device.name=cuda:99",), "device=cuda"),
    Case("device", "train", ("device=cpu", "device.dtype=float16"), "float16 is not supported on the CPU"),
    Case("device", "train", ("device.dtype=float8",), "device.dtype='float8' is not one of"),
    Case("device", "sample", ("ckpt={run}", "device.name=tpu"), "device='tpu' is not a device"),
    # prompt
    Case("prompt", "sample", ("ckpt={run}", "prompt=Q"), "'Q' (U+0051) is not in the vocabulary"),
    Case("prompt", "sample", ("ckpt={run}", "prompt="), "prompt is empty"),
    Case("prompt", "sample", ("ckpt={run}", "prompt_file={binary}"), "is not UTF-8 text"),
]


class EvilPayload:
    """Pickles as a call to os.system: what a crafted checkpoint would run on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class NotFoundServer:
    """A loopback HTTP server that answers 404 to everything."""

    def __init__(self, folder: Path):
        handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {
            "log_message": lambda *args: None,
            "__init__": lambda self, *a, **k: http.server.SimpleHTTPRequestHandler.__init__(
                self, *a, directory=str(folder), **k),
        })
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


# The rows that start a real ``python -m`` process: the first of each entry point.
REAL = {next(c.label for c in CASES if c.entry == entry) for entry in {c.entry for c in CASES}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_run):
    """A trained tiny run and a collection of broken files to feed the entry points."""
    root = tmp_path_factory.mktemp("bad")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"{n}: I speak of {t}.\n" for n in ("ROMEO", "JULIET")
                              for t in ("love", "the moon")) * 200)
    run = copy_of_trained_run(trained_run, root)
    files = {"corpus": corpus, "run": run, "evil": root / "evil.pt", "truncated": root / "truncated.pt",
             "plain": root / "plain.pt", "empty_dir": root / "empty", "binary": root / "binary.txt"}
    marker = root / "code-ran"
    torch.save({"model": EvilPayload(marker), "model_config": {}}, files["evil"])
    last = (run / "last.pt").read_bytes()
    files["truncated"].write_bytes(last[: len(last) // 2])
    torch.save({"weights": torch.zeros(3)}, files["plain"])
    files["empty_dir"].mkdir()
    files["binary"].write_bytes(bytes(range(128, 256)) * 4)
    server = NotFoundServer(files["empty_dir"])
    files["url"] = server.url
    yield root, files, marker
    server.server.shutdown()


def run_case(case: Case, files: dict, cwd: Path) -> subprocess.CompletedProcess:
    """The row's command in its own empty directory cwd."""
    args = [a.format(**files) for a in case.args]
    resuming = any(a.startswith("resume=") for a in args)
    if case.entry == "train" and not resuming:
        args.append(f"hydra.run.dir={cwd / 'run'}")
        if not any(a.startswith("max_iters=") for a in args):
            args.append("max_iters=1")  # a row that wrongly passes must not train for long
    if case.entry in ("train", "data") and not any(a.startswith("data_root=") for a in args):
        args.append(f"data_root={cwd / 'data'}")
    run = run_module if case.label in REAL else run_in_process
    return run(f"nanogpt.{case.entry}", *args, cwd=cwd)


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_bad_input_fails_with_one_clear_line(case, world, tmp_path):
    cwd = tmp_path / "case"
    cwd.mkdir()
    result = run_case(case, world[1], cwd)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and case.expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (cwd / "run").exists() and not (cwd / "outputs").exists()  # no half-made run
    assert not world[2].exists()  # the crafted checkpoint never ran its code


def test_every_area_and_entry_point_is_covered():
    assert {c.area for c in CASES} == {"config", "data", "checkpoint", "device", "prompt"}
    assert {c.entry for c in CASES} == {"train", "sample", "data", "export", "report", "eval"}


def test_the_crafted_checkpoint_would_run_code_if_unpickled_unsafely(world, tmp_path):
    """The refusal above means something: loading without weights_only runs the payload."""
    root, files, _ = world
    marker = tmp_path / "ran"
    torch.save({"model": EvilPayload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("value", ["0", "yes", "", "1"])
def test_hydra_full_error_is_on_only_for_1_as_in_hydra(value, tmp_path):
    env = {"HYDRA_FULL_ERROR": value}
    if value == "1":  # the traceback the interpreter itself prints, from a real process
        env = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).parent.parent)}
        result = subprocess.run([sys.executable, "-m", "nanogpt.train", "model=huge"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
    else:
        result = run_in_process("nanogpt.train", "model=huge", cwd=tmp_path, env=env)
    assert result.returncode != 0
    if value == "1":  # the full report, for debugging
        assert "Traceback" in result.stderr
    else:
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [
            "error: model=huge is not an option; choose one of: " + ", ".join(sorted(
                p.stem for p in (Path(__file__).parent.parent / "conf" / "model").glob("*.yaml")))]
