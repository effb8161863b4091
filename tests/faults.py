"""Run ``python -m nanogpt.train`` with deterministic faults patched in, to test recovery for real.

Usage: ``python -m tests.faults SPEC [train overrides]``; SPEC is a comma-separated list of:

- ``signal_at_iter=K:SIGTERM`` sends the process SIGTERM (or SIGINT) just
  before optimizer step K, as a cluster scheduler or a Ctrl-C would;
  ``signal_at_iter=K:SIGINT*2`` sends it twice in a row (an impatient Ctrl-C).
- ``signal_in_eval=K:SIGTERM`` sends it in the middle of the evaluation at iteration K
  (after its second batch); ``signal_in_eval=K:SIGTERM@R`` only on rank R of a torchrun job.
- ``signal_mid_step=K:SIGTERM`` sends it in the middle of step K: after its forward
  pass has drawn the next batch from the sampler, before the backward pass.
- ``kill_at_iter=K`` kills the process with SIGKILL just before step K, as an
  out-of-memory killer or a lost node would, with nothing saved since the last evaluation.
- ``data_error_on_rank=R`` makes data preparation fail on rank R alone, as a
  file missing on one node would.
- ``nan_loss_at_iter=K`` makes step K diverge: its loss and the weights become NaN.
- ``kill_during_save=N`` kills the process with SIGKILL in the middle of writing
  the N-th last.pt: half of the file is on disk and nothing is renamed yet.
- ``disk_full=NAME@N`` makes the N-th atomic write of a file called NAME (last.pt,
  train.bin, meta.json, ...; N defaults to 1) fail half-way with ENOSPC, as a full
  disk would: the file system takes half the bytes, then refuses the rest.

The product has no hooks for this: the functions are replaced here, in the test process only.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from nanogpt import train
from nanogpt.dataset import batches, pipeline, sources, workers
from nanogpt.errors import DataError
from nanogpt.training import setup, trainer
from nanogpt.weights import checkpoint


def parse(spec: str) -> dict[str, str]:
    """SPEC as {name: value}."""
    items = (item.partition("=") for item in spec.split(",") if item.strip())
    return {name.strip(): value.strip() for name, _, value in items}


def send_signal(spec: str, iteration: int) -> None:
    """Send the signal "K:NAME[*TIMES][@RANK]" asks for, if iteration is K (and this is rank RANK)."""
    spec, _, rank = spec.partition("@")
    at, _, name = spec.partition(":")
    name, _, times = name.partition("*")
    if int(at) == iteration and (not rank or int(rank) == int(os.environ.get("RANK", 0))):
        for _ in range(int(times or 1)):
            os.kill(os.getpid(), getattr(signal, name or "SIGTERM"))


def install(faults: dict[str, str]) -> None:
    """Patch the training step, evaluation and checkpoint writing as the faults ask."""
    original_step = trainer.Trainer.train_step
    original_eval_batch_done = trainer.Trainer.eval_batch_done
    original_get_batch = batches.BatchSampler.get_batch
    saves = {"count": 0}
    writes: dict[str, int] = {}
    full_name, _, full_at = faults.get("disk_full", "").partition("@")
    in_step = {"iter": None}

    def get_batch(self, split, evaluation=False):
        batch = original_get_batch(self, split, evaluation)
        if "signal_mid_step" in faults and not evaluation and in_step["iter"] is not None:
            send_signal(faults["signal_mid_step"], in_step["iter"])
        return batch

    def train_step(self):
        in_step["iter"] = self.iter_num
        if int(faults.get("kill_at_iter", -1)) == self.iter_num:
            os.kill(os.getpid(), signal.SIGKILL)
        if "signal_at_iter" in faults:
            send_signal(faults["signal_at_iter"], self.iter_num)
        loss = original_step(self)
        if int(faults.get("nan_loss_at_iter", -1)) == self.iter_num:
            for p in self.model.parameters():  # diverged weights, which must never be saved
                p.data.fill_(float("nan"))
            loss = loss * float("nan")
        return loss

    def patched_write(original_write):
        def write_atomically(dest, write):
            def cut_short(tmp):
                write(tmp)
                if dest.name == checkpoint.LAST:
                    saves["count"] += 1
                    if saves["count"] == int(faults.get("kill_during_save", 0)):
                        with open(tmp, "r+b") as f:
                            f.truncate(tmp.stat().st_size // 2)
                        os.kill(os.getpid(), signal.SIGKILL)
                if dest.name == full_name:
                    writes[dest.name] = writes.get(dest.name, 0) + 1
                    if writes[dest.name] == int(full_at or 1):
                        with open(tmp, "r+b") as f:
                            f.truncate(tmp.stat().st_size // 2)
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original_write(dest, cut_short)
        return write_atomically

    def eval_batch_done(self, done, total):
        if "signal_in_eval" in faults and done == 2:
            send_signal(faults["signal_in_eval"], self.iter_num)
        original_eval_batch_done(self, done, total)

    def prepare_dataset(dataset, data_root, *args, **kwargs):
        if int(faults.get("data_error_on_rank", -1)) == int(os.environ.get("RANK", 0)):
            raise DataError(f"dataset.source={dataset.source} does not exist on this node")
        return original_prepare(dataset, data_root, *args, **kwargs)

    original_prepare = setup.prepare_dataset
    setup.prepare_dataset = prepare_dataset
    trainer.Trainer.train_step = train_step
    batches.BatchSampler.get_batch = get_batch
    trainer.Trainer.eval_batch_done = eval_batch_done
    for module in (checkpoint, workers, pipeline, sources):  # each imported fileio's function by name
        module.write_atomically = patched_write(module.write_atomically)


if __name__ == "__main__":
    install(parse(sys.argv.pop(1)))
    train.main()
