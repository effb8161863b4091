"""Checkpoints: one file holds everything sampling and resuming need.

A checkpoint is a dict of tensors and plain Python data (numbers, strings,
lists, dicts): the model's shape, its weights, the tokenizer, the optimizer
state, the iteration, the best validation loss and the run's resolved config.
Because it holds nothing else, it loads with torch.load(weights_only=True),
which never runs code from the file. Writes are atomic. An FSDP job's
checkpoints keep their weights and optimizer state in a folder of shards
beside the file instead (sharded.py); reading one gives the same whole state.
"""

from __future__ import annotations

import pickle
import secrets
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from nanogpt.errors import CheckpointError
from nanogpt.fileio import write_atomically
from nanogpt.runtime.distributed import DistributedContext, from_main, launch_command
from nanogpt.weights import sharded

CHECKPOINT_FORMAT = 1
BEST, LAST = "best.pt", "last.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write state to path atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = RefusedWrites(f)
            try:
                torch.save({"format": CHECKPOINT_FORMAT, **state}, sink)
            except RuntimeError:
                if sink.refused is None:
                    raise
        if sink.refused is not None:  # the file system's own reason (no space, quota), for write_atomically
            raise OSError(sink.refused.errno, sink.refused.strerror, str(tmp))

    write_atomically(path, write)


class RefusedWrites:
    """A file for torch.save that keeps the OSError of a write the file system refused.

    torch.save reports a refused write (a full disk, a quota) as an internal
    RuntimeError ("unexpected pos ..."); kept here, the real reason can be told.
    """

    def __init__(self, file):
        self.file, self.refused = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.refused = error
            raise

    def flush(self) -> None:
        self.file.flush()


def read_torch_file(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> object:
    """What torch.save wrote to path, read without executing anything from it; clear errors for bad files.

    Used for our checkpoints and for karpathy/nanoGPT's ckpt.pt alike: both hold
    only tensors and plain data, so weights_only=True reads them. With mmap the
    tensors are the file's bytes mapped into memory (privately: changing one
    leaves the file as it is), read from disk only where they are used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        # torch.save writes zip archives; anything else is cut short, damaged, or a raw
        # pickle, and a raw pickle is never read because reading it could run code.
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupted or not a torch.save file (raw pickles are "
            "refused: loading them could run code); use another checkpoint, e.g. the run's last.pt or best.pt"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                      lines[0] if lines else type(e).__name__)
        raise CheckpointError(
            f"checkpoint {path} holds more than tensors and plain data and was refused "
            f"(loading it could run code): {reason}"
        ) from None
    except Exception as e:  # noqa: BLE001 (a damaged archive fails in many ways, none of them a bug here)
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted and cannot be read "
            f"({type(e).__name__}); use another checkpoint, e.g. last.pt or best.pt of the run"
        ) from None


def is_our_checkpoint(state: object) -> bool:
    """True for a dict written by save_checkpoint (it names its model's shape in model_config)."""
    return isinstance(state, dict) and ("model" in state or "shards" in state) and "model_config" in state


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read one of our checkpoints without executing anything from it; clear errors for bad files.

    A sharded checkpoint's weights stay on disk (with_weights() reads them whole); its
    "shards" becomes the folder's full path, once every shard in it has been found.
    mmap: see read_torch_file.
    """
    state = read_torch_file(path, map_location, mmap)
    if not is_our_checkpoint(state):
        raise CheckpointError(f"{path} is not a nanogpt checkpoint (no model or model_config in it)")
    return find_shards(state, Path(path))


def find_shards(state: dict, path: Path) -> dict:
    """The state read from path; a sharded one's folder (named relative to path) found and checked."""
    if "shards" in state:
        folder = Path(path).resolve().parent / state["shards"]  # already a full path if read before
        sharded.check(folder, path)
        state["shards"] = str(folder)
    return state


def with_weights(state: dict, path: Path) -> dict:
    """The state read from path with every weight in "model": a sharded one's assembled from its shards."""
    if "model" not in state:
        state = find_shards(state, path)
        state["model"] = sharded.read_whole(Path(state["shards"]), path)
    return state


def weights_of(state: dict, path: Path) -> Mapping[str, torch.Tensor]:
    """The weights of the state read from path, by name: its own, or a sharded one's read when looked up."""
    if "model" in state:
        return state["model"]
    return sharded.read_each(Path(find_shards(state, path)["shards"]), path)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best (else last) checkpoint."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run directory {path} holds no {BEST} or {LAST}")
    raise CheckpointError(f"ckpt={path} does not exist; give a checkpoint file or a run directory")


def newest_checkpoint(outputs: str | Path) -> Path:
    """The best (else last) checkpoint of the most recently written run under outputs."""
    outputs = Path(outputs)
    found = [p for name in (BEST, LAST) for p in outputs.rglob(name)]
    if not found:
        raise CheckpointError(
            f"no checkpoint found under {outputs.resolve()}; train first or pass ckpt=PATH"
        )
    newest_run = max(found, key=lambda p: p.stat().st_mtime).parent
    return find_checkpoint(newest_run)


class RunCheckpoints:
    """A training run's two checkpoints: last.pt (to resume from) and best.pt (what sampling reads).

    Only the process that owns the run (rank 0) writes; every process keeps
    track of the newest, for the messages a stop or a divergence prints.
    """

    def __init__(self, run_dir: Path, job: DistributedContext, saved_iter: int | None = None):
        self.run_dir, self.job, self.saved_iter = Path(run_dir), job, saved_iter
        self.writes = job.is_main
        if saved_iter is not None and self.writes:
            remove_stale_temporaries(self.run_dir)  # left by a process killed while saving

    def save(self, state: dict, best: bool) -> None:
        """Write state (a Trainer.state_dict()) to last.pt and, if best, its model to best.pt.

        Sharded (an FSDP job's), every process writes its shards of both; otherwise rank 0 writes.
        """
        if sharded.holds_shards(state):
            self.save_sharded(state, best)
        elif self.writes:
            if best:  # sampling needs neither the optimizer nor the training position
                save_checkpoint(self.run_dir / BEST, {key: value for key, value in state.items()
                                                      if key not in ("training", "optimizer")})
                sharded.remove_others(self.run_dir, BEST, keep=None)  # a sharded run resumed unsharded
            save_checkpoint(self.run_dir / LAST, state)
            sharded.remove_others(self.run_dir, LAST, keep=None)
        self.saved_iter = state["iter_num"]

    def save_sharded(self, state: dict, best: bool) -> None:
        """Every process writes its shards into new folders; then rank 0 commits the .pt files naming them.

        The tensors of the optimizer's state are sharded; its hyperparameters (param_groups),
        the same on every process, stay in last.pt with the rest.
        """
        tag = from_main(f"{state['iter_num']:06d}-{secrets.token_hex(3)}", self.job)  # one name, chosen once
        weights, optimizer = state["model"], state["optimizer"]
        description = {k: v for k, v in state.items() if k not in ("model", "optimizer", "training")}
        if best:
            self.commit(BEST, {"model": weights}, description, tag)
        self.commit(LAST, {"model": weights, "optimizer": optimizer["state"]},
                    {**description, "training": state["training"],
                     "optimizer": {"param_groups": optimizer["param_groups"]}}, tag)

    def commit(self, name: str, tensors: dict, rest: dict, tag: str) -> None:
        """Write tensors' shards to a new folder; rank 0 then names it in the .pt file, drops the old one."""
        folder = sharded.folder_name(name, tag)
        sharded.write(self.run_dir / folder, tensors)  # returns once every shard and .metadata are written
        if self.writes:
            save_checkpoint(self.run_dir / name, {**rest, "shards": folder})
            sharded.remove_others(self.run_dir, name, keep=folder)

    def describe(self) -> str:
        """Where the newest good checkpoint is, for messages about stopping."""
        if self.saved_iter is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.run_dir / LAST} (iteration {self.saved_iter})"

    def how_to_resume(self) -> str:
        """What a stopped run says: where it saved, and the command that goes on (as it was launched)."""
        again = launch_command(f"nanogpt.train resume={self.run_dir}", self.job)
        return f"saved {self.run_dir / LAST}; resume with: {again}"


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary checkpoint files a process killed while saving left in run_dir."""
    for stale in Path(run_dir).glob(".*.pt.*.tmp"):
        stale.unlink(missing_ok=True)
