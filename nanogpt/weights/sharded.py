"""Sharded checkpoints: the weights and optimizer state of an FSDP job, written by every process at once.

The tensors are saved with PyTorch's Distributed Checkpoint (DCP), one folder
per checkpoint, each process writing its own part; the small rest (the run's
description, position, random states, the optimizer's hyperparameters) goes
into the run's usual best.pt / last.pt, which names the folder beside it:

    last.pt                       everything a last.pt holds but the sharded tensors; "shards": the folder
    last.shards.000250-3fa9c1/    DCP: .metadata and one __R_0.distcp file per process
    best.pt, best.shards.…/       the same for the best model (weights only)

The .pt file is the commit point: the folder is written whole, under a name no
earlier checkpoint used, before rank 0 replaces the .pt file atomically, and
the folder it named before is removed only after. A crash at any moment leaves
a .pt file naming a complete folder (RunCheckpoints in checkpoint.py).

Reading needs neither torchrun nor the job's size: DCP assembles each tensor
from whichever files hold its pieces, so a training job of any size takes its
own share (read_into; load_into puts a checkpoint, sharded or whole, into a job's
model and optimizer, whatever its layout: torch's get_state_dict/set_state_dict key
the optimizer's state by parameter name), and sample, eval, export and init_from
take whole tensors (read_whole). DCP's .metadata is a pickle; it is read with an unpickler that
admits only DCP's own record classes, so reading a checkpoint never runs code
from it (as torch.load(weights_only=True) guarantees for .pt files). Its table
of which bytes of which file hold each tensor names a missing or cut-short shard
before anything is read.

DCP is imported where a sharded checkpoint is written or read: it brings most of
torch.distributed (0.7 s), which reading any other checkpoint would pay.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from nanogpt.errors import CheckpointError
from nanogpt.fileio import OnDemand
from nanogpt.runtime import sharding

METADATA = ".metadata"  # DCP's name for its table of contents
# What DCP's .metadata may name: its own record classes, tensor sizes, dtypes and layouts, paths.
RECORD_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
RECORD_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


def holds_shards(state: dict) -> bool:
    """True for a training state whose weights are this process's shards (DTensors) of an FSDP job's."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # imported by FSDP, before any shard exists
    return dtensor is not None and any(isinstance(value, dtensor.DTensor)
                                       for value in state.get("model", {}).values())


def folder_name(checkpoint: str, tag: str) -> str:
    """The folder that holds the shards of checkpoint (best.pt, last.pt) for one save, tagged tag."""
    return f"{Path(checkpoint).stem}.shards.{tag}"


def write(folder: Path, tensors: dict) -> None:
    """Every process writes its part of tensors (nested dicts of tensors and DTensors) into folder."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder))


def remove_others(run_dir: Path, checkpoint: str, keep: str | None) -> None:
    """Delete the shard folders of checkpoint in run_dir but keep (superseded, or never committed)."""
    for folder in run_dir.glob(folder_name(checkpoint, "*")):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


class RecordUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata records and refuses anything else, before importing or calling it."""

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in RECORD_MODULES or (module, name) in RECORD_NAMES or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def reader(folder: Path):
    """DCP's file reader for folder, reading .metadata without running code from it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class CheckedReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            with open(Path(self.path) / METADATA, "rb") as f:
                metadata = RecordUnpickler(f).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP metadata")
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(folder)


def check(folder: Path, named_by: Path):
    """The folder's table of contents, once every shard it lists is found whole; else the fault, named."""
    where = f"checkpoint {named_by}"
    if not folder.is_dir():
        raise CheckpointError(f"{where} keeps its weights in {folder.name}/ beside it, which is missing; "
                              "copy the run directory whole")
    if not (folder / METADATA).is_file():
        raise CheckpointError(f"{where}: {folder.name}/{METADATA} is missing, so its shards cannot be read; "
                              "use another checkpoint of the run (best.pt or last.pt)")
    try:
        metadata = reader(folder).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{where}: {folder.name}/{METADATA} is damaged or holds more than checkpoint "
                              f"records, and was refused (loading it could run code): {e}") from None
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    if any(isinstance(entry, BytesStorageMetadata) for entry in metadata.state_dict_metadata.values()):
        raise CheckpointError(f"{where}: {folder.name} holds pickled objects beside its tensors and was "
                              "refused (loading them could run code); it was not written by nanogpt")
    needed: dict[str, int] = {}  # each file, and how many bytes of it the tensors occupy
    for piece in metadata.storage_data.values():
        needed[piece.relative_path] = max(needed.get(piece.relative_path, 0), piece.offset + piece.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            present = sum((folder / other).is_file() for other in needed)
            raise CheckpointError(f"{where}: its shard {folder.name}/{name} is missing ({present} of "
                                  f"{len(needed)} shard files are there); copy the run directory whole, or "
                                  "use another checkpoint of the run")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{where}: its shard {folder.name}/{name} is cut short "
                                  f"({shard.stat().st_size} of {size} bytes); use another checkpoint")
    return metadata


def holds(folder: Path, key: str) -> bool:
    """True if the checkpoint in folder holds tensors under key ("model", "optimizer")."""
    names = reader(folder).read_metadata().state_dict_metadata
    return any(name.startswith(f"{key}.") for name in names)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Quiet DCP's warning that it reads in a process outside a torchrun job: what a reader means to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


def read_into(folder: Path, tensors: dict) -> None:
    """Fill tensors (nested dicts of this process's tensors or DTensors) from folder, in place.

    Under torchrun every process calls it together; each reads the pieces its shares need.
    """
    import torch.distributed.checkpoint as dcp

    with alone():
        dcp.load(tensors, storage_reader=reader(folder))


def read_whole(folder: Path, named_by: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The whole tensors under key (every weight), assembled from all the shards, in this process alone."""
    return dict(read_each(folder, named_by, key))


def read_each(folder: Path, named_by: Path, key: str = "model") -> OnDemand:
    """The tensors under key by name, each assembled whole from the shards when looked up, in this process.

    A reader that keeps only part of each (a sharded job's init_from) so never
    holds more than one whole tensor.
    """
    import torch.distributed.checkpoint as dcp

    prefix, metadata = f"{key}.", check(folder, named_by)
    entries = {name.removeprefix(prefix): entry
               for name, entry in metadata.state_dict_metadata.items() if name.startswith(prefix)}

    def read(name: str) -> torch.Tensor:
        tensor = torch.empty(entries[name].size, dtype=entries[name].properties.dtype)
        with alone():
            dcp.load({key: {name: tensor}}, storage_reader=reader(folder), no_dist=True)
        return tensor

    return OnDemand(entries, read)


def load_into(model: nn.Module, optimizer, state: dict) -> None:
    """Put a checkpoint's weights and optimizer state into this process's model and optimizer.

    A sharded checkpoint (state["shards"]) is read by DCP, each process reading
    what its share needs, whatever the job's size and layout now; from a whole
    one (DDP's, or a single process's, read through a memory map), each process
    copies its own rows of every tensor. Either way no process holds more than its share.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    parts = sharding.torch_optimizers(optimizer)
    weights, optimizer_state = get_state_dict(model, list(parts.values()))  # this process's: what to fill
    if "shards" in state:
        folder = Path(state["shards"])
        if not holds(folder, "optimizer"):  # saved before the first step
            optimizer_state["state"] = {}
        read_into(folder, {"model": weights, "optimizer": optimizer_state["state"]})
        optimizer_state["param_groups"] = state["optimizer"]["param_groups"]
    else:
        saved = keyed_by_name(state["optimizer"], parts, model)
        if not saved["state"]:
            optimizer_state["state"] = {}
        fill_from({"model": weights, "optimizer": optimizer_state["state"]},
                  {"model": state["model"], "optimizer": saved["state"]})
        optimizer_state["param_groups"] = saved["param_groups"]
    set_state_dict(model, list(parts.values()), model_state_dict=weights, optim_state_dict=optimizer_state)
    if not optimizer_state["state"]:
        sharding.forget_state(list(parts.values()), optimizer_state)


def fill_from(shares: dict, whole: dict) -> None:
    """Fill shares (nested dicts of this process's tensors and shards) in place from whole's, name by name."""
    for key, share in shares.items():
        if isinstance(share, dict):
            fill_from(share, whole[key])
        elif isinstance(share, torch.Tensor):
            sharding.put_rows(share, whole[key])
        else:
            shares[key] = whole[key]


def keyed_by_name(saved: dict, parts: dict[str, torch.optim.Optimizer], model: nn.Module) -> dict:
    """A whole optimizer.state_dict() (parameters numbered in group order) keyed by parameter name instead.

    The run builds its optimizer's groups over the same parameters in the same
    order as the run that saved (resume keeps the model and optimizer), so the
    n-th number of a saved group is the n-th parameter of the group now.
    """
    names = {param: name.replace(sharding.COMPILED, "") for name, param in model.named_parameters()}
    state, groups = {}, []
    for key, part in parts.items():
        own = saved[key] if key else saved
        for group, saved_group in zip(part.param_groups, own["param_groups"], strict=True):
            name_of = dict(zip(saved_group["params"], (names[p] for p in group["params"]), strict=True))
            state.update({name_of[n]: value for n, value in own["state"].items() if n in name_of})
            groups.append({**saved_group, "params": list(name_of.values())})
    return {"state": state, "param_groups": groups}
