"""Training on many processes with torch.distributed: torchrun, multi-node, SLURM.

One process per GPU (or several on a CPU, with gloo), all running the same
training loop, the model under DistributedDataParallel, or sharded with FSDP2
(distributed.strategy=fsdp; sharding.py). The pieces here:

* DistributedContext: which process this is (rank, local rank, world size),
  read from the environment torchrun sets, or from SLURM's when Hydra's
  submitit launcher started one task per GPU (submitit's helper exports the
  same variables).
* run_with_shared_run_dir(): Hydra names a run directory after the current
  time, so processes started a moment apart would each make their own. Rank 0
  composes the config first and tells the others its directory, which they
  then use as theirs (``hydra.run.dir=...``, without Hydra's .hydra folder):
  one run directory per job, no stray ones.
* all_reduce_mean(): average numbers across processes, so every rank logs,
  compares and checkpoints the same losses.
* StopVote, gather_to_main(), barrier(): the job's control traffic (stopping
  together, every rank's random state into rank 0's checkpoint) on a gloo
  group of its own, with small CPU tensors that never wait on a GPU.

Only rank 0 writes (checkpoints, metrics, trackers, the log); the others
compute and keep quiet. Nothing here imports Hydra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanogpt.errors import ConfigError
from nanogpt.options import check_choices, option

# Exit status of the other ranks when rank 0 failed before training without an exit status of its own.
EXIT_RANK0_FAILED = 2


STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistributedConfig:
    """The ``distributed`` options: how the processes of a torchrun job hold the model."""

    strategy: str = option(
        "ddp", "ddp: every process holds all weights, gradients and optimizer state (fastest while they fit "
               "one GPU); fsdp: each holds 1/N of them (FSDP2), for models larger than one GPU "
               "(docs/distributed.md)", choices=STRATEGIES)

    def __post_init__(self):
        check_choices(self)


@dataclass
class DistributedContext:
    """Where this process stands in a distributed job; a single process is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and logs."""
        return self.rank == 0


def context_from_environment() -> DistributedContext:
    """Where this process stands, from torchrun's variables or a submitit SLURM task's."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
            and "SUBMITIT_EXECUTOR" in os.environ:
        # Hydra's submitit launcher starts one SLURM task per GPU; submitit knows
        # how to turn SLURM's variables into torch.distributed's.
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return DistributedContext(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_process_group(context: DistributedContext) -> bool:
    """Join the job's process group (once); return True if this call created it.

    NCCL carries CUDA tensors and gloo CPU ones, so a job can reduce both.
    """
    if not context.enabled or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")
    _Control.group = dist.new_group(backend="gloo")  # every rank, at the same point: a collective
    return True


class _Control:
    """The gloo group that carries the job's control traffic (see the module doc)."""

    group = None


class StopVote:
    """Agree across ranks on whether to stop, once per call, without a host sync on the GPU.

    Each poll(local) starts an all-reduce (MAX) of a one-number CPU tensor, local
    being 0 or the signal this rank received, on the gloo control group, and
    returns a finished round's result: every rank gets the same answer from the
    same call, so all stop after the same step, for the same signal (exit status).

    Where the job computes on the CPU, poll waits for its own round: a few tens
    of microseconds beside a step that already all-reduces its gradients through
    gloo, and the stop comes right after the step the signal arrived in. On GPUs
    a step is queued ahead of the device, and waiting for a vote would be cheap
    (gloo never touches the GPU stream) but still a network round trip on the
    critical path; there poll returns the previous round, whose result is long in,
    so the stop comes one step later and no step waits. Unlike an all-reduce of a
    CUDA tensor read with .item(), this never synchronises the host with the GPU.
    """

    def __init__(self, context: DistributedContext, device: torch.device):
        self.enabled = context.enabled and _Control.group is not None
        self.lag = 1 if device.type == "cuda" else 0
        self.pending: deque = deque()

    def poll(self, local: int) -> int:
        """Vote local (0: go on, or a signal number); return the job's decision (0 or a signal)."""
        if not self.enabled:
            return local
        tensor = torch.tensor([local], dtype=torch.int32)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_Control.group, async_op=True)
        self.pending.append((tensor, work))
        decision = 0
        while len(self.pending) > self.lag:
            tensor, work = self.pending.popleft()
            work.wait()
            decision = max(decision, int(tensor.item()))
        return decision

    def close(self) -> None:
        """Finish the rounds still in flight (before the process group goes away)."""
        while self.pending:
            self.pending.popleft()[1].wait()


@contextlib.contextmanager
def set_up_together(context: DistributedContext) -> Iterator[None]:
    """Run a rank's setup (data, model), then agree across ranks that every one succeeded.

    A rank whose setup fails (a file missing on its node) says so in the vote and
    raises its own error, which it reports; the others leave quietly with
    EXIT_RANK0_FAILED instead of meeting a dead peer in DDP's first collective
    and printing that collective's traceback.
    """
    if not context.enabled or _Control.group is None:
        yield
        return
    try:
        yield
    except BaseException:
        dist.all_reduce(torch.ones(1), op=dist.ReduceOp.MAX, group=_Control.group)
        raise
    failed = torch.zeros(1)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=_Control.group)
    if failed.item():
        sys.exit(EXIT_RANK0_FAILED)


def gather_to_main(value: object, context: DistributedContext) -> list | None:
    """Every rank's value, in rank order, on rank 0 (None elsewhere); [value] for a single process."""
    if not context.enabled:
        return [value]
    values = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, values, dst=0, group=_Control.group)
    return values


def from_main(value: object, context: DistributedContext) -> object:
    """Rank 0's value, on every rank (value itself for a single process)."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_Control.group)
    return box[0]


def barrier(context: DistributedContext) -> None:
    """Wait for every rank: e.g. for rank 0 to finish saving before anyone exits.

    torchrun stops the whole job as soon as one process exits with a failure
    status (a stopped run exits 130/143), so a rank that left early would have
    rank 0 killed in the middle of writing its checkpoint.
    """
    if context.enabled:
        dist.barrier(group=_Control.group)


def device_for(context: DistributedContext, device: torch.device) -> torch.device:
    """Each process of a job takes its own GPU: cuda:LOCAL_RANK."""
    if context.enabled and device.type == "cuda":
        if context.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {context.rank} has LOCAL_RANK {context.local_rank} but this node has "
                f"{torch.cuda.device_count()} GPU(s); use at most that many processes per node"
            )
        return torch.device("cuda", context.local_rank)
    return device


def per_rank_accumulation(global_steps: int, context: DistributedContext) -> int:
    """Micro-batches each process runs so that together they make gradient_accumulation_steps.

    A total the processes cannot share evenly is refused, naming the totals nearest to it that they
    can; it is never rounded behind the user's back (that would change the run's batch).
    """
    processes = context.world_size
    if global_steps % processes:
        below, above = global_steps // processes * processes, (global_steps // processes + 1) * processes
        nearest = " or ".join(f"gradient_accumulation_steps={n}" for n in (below, above) if n > 0)
        raise ConfigError(
            f"gradient_accumulation_steps={global_steps} must be a multiple of the number of "
            f"processes ({processes}), so every process runs the same number of micro-batches: "
            f"give {nearest} (any multiple of {processes})"
        )
    return global_steps // processes


def all_reduce_mean(values: dict[str, float], context: DistributedContext, device: torch.device) -> dict:
    """The mean of each value over all processes (unchanged for a single process)."""
    if not context.enabled:
        return values
    keys = sorted(values)
    # CUDA tensors go through NCCL; everything else through gloo.
    where = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=where)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: v / context.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}


def silence_other_ranks(context: DistributedContext) -> None:
    """Keep the log to rank 0: the others would print every line again."""
    if not context.is_main:
        logging.getLogger("nanogpt").setLevel(logging.WARNING)


class _RunDirAnnouncement:
    """Rank 0 tells the other ranks its run directory, exactly once (or the status it ended with instead)."""

    sent = False

    @classmethod
    def send(cls, message: str | int) -> None:
        """Broadcast the run directory, or rank 0's exit status if it ended without one, if not yet done."""
        if cls.sent or not dist.is_initialized() or dist.get_rank() != 0:
            return
        cls.sent = True
        dist.broadcast_object_list([message], src=0)

    @staticmethod
    def receive() -> str | int:
        """Wait for rank 0's run directory (or its exit status)."""
        message = [None]
        dist.broadcast_object_list(message, src=0)
        return message[0]


def announce_run_dir(run_dir) -> None:
    """Called by rank 0's task once Hydra has made its run directory; a no-op elsewhere."""
    _RunDirAnnouncement.send(str(run_dir))


def is_multirun(argv: list[str]) -> bool:
    """True for ``-m``/``--multirun``: each job then gets its directory from the launcher."""
    return any(arg in ("-m", "--multirun") for arg in argv[1:])


def run_with_shared_run_dir(hydra_main: Callable[[], None]) -> None:
    """Run a Hydra entry point in every process of a torchrun job, all in rank 0's run directory.

    A single process, or a multirun (where the launcher fixes each job's
    directory before any process starts), just runs hydra_main.
    """
    context = context_from_environment()
    if not context.enabled or is_multirun(sys.argv):
        hydra_main()
        return
    init_process_group(context)
    try:
        if context.is_main:
            status = EXIT_RANK0_FAILED
            try:
                hydra_main()
                status = 0
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                raise
            finally:
                # Unblock the others if no directory was announced: they end as rank 0 did (0: nothing
                # to do, e.g. a finished run resumed; 2: it refused; EXIT_RANK0_FAILED if it crashed).
                _RunDirAnnouncement.send(status)
        else:
            run_dir = _RunDirAnnouncement.receive()
            if isinstance(run_dir, int):
                sys.exit(run_dir)
            # Use rank 0's directory; leave Hydra's own record of the run to rank 0.
            sys.argv += [f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=null"]
            hydra_main()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """Inside, DDP does not all-reduce gradients: they keep accumulating locally.

    During gradient accumulation only the last micro-batch's backward pass
    needs to synchronise; the earlier ones would only send data to be summed again.
    """
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def check_world_size(saved: int, world_size: int, sharded: bool = False) -> None:
    """Refuse to resume a run on a different number of processes than it was saved with, unless sharded.

    Each process's random state and its share of the next batch are saved per
    rank; with another number of ranks they would not add up to the same run.
    A sharded checkpoint, or a sharded job, resumes at any size: DCP (or FSDP)
    hands each process its share of every tensor, and the processes draw their
    next batch and dropout afresh (own_share).
    """
    if saved != world_size and not sharded:
        launch = "python -m" if saved == 1 else f"torchrun --nproc_per_node={saved} -m"
        raise ConfigError(
            f"resume: the run was saved by {saved} process(es) and this job has {world_size}; resume it "
            f"with as many ({launch} nanogpt.train resume=...), or start a new run from its weights "
            "(model.init_from=RUN_DIR)"
        )


def own_share(training: dict, context: DistributedContext) -> dict | None:
    """The random state and next batch of this process in a saved training state; None from another job size.

    A checkpoint keeps every rank's under "ranks" (None for a single process);
    the state a stop rewinds to (Trainer.state_dict(weights=False)) is this process's own.
    """
    if "ranks" not in training:
        return training
    if training.get("world_size", 1) != context.world_size:
        return None
    return training["ranks"][context.rank] if training["ranks"] else training


def launch_command(module_args: str, context: DistributedContext) -> str:
    """The command that runs ``python -m module_args`` as this job was launched (one process, or torchrun)."""
    if not context.enabled:
        return f"python -m {module_args}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    if local == context.world_size:
        return f"torchrun --standalone --nproc_per_node={local} -m {module_args}"
    return f"torchrun <this job's options, on every node> -m {module_args}"
