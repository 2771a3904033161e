"""Data-parallel training of one family: one process per GPU (gloo processes on a CPU), PyTorch DDP.

``families.<name>.train.distributed: N | all`` asks for it. ``python -m flows.cli train <name>``
then relaunches itself under ``torchrun`` (``launch``); inside, every process sees the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and ``process_group`` joins them.

What each process does (see ``tasks.train.Trainer``):

- the same model and optimizer from the same seed; DDP averages the gradients, so every
  process takes the same update;
- the global batch of a step is the one single-process training takes (``batch_indices``); a
  process trains on its contiguous 1/N share of it (what ``DistributedSampler`` does per epoch,
  done per step so the batch order stays a pure function of the step);
- randomness inside the step (noise, dropout) comes from a seed of (seed, step, rank), so a
  resumed run draws what the uninterrupted one would have drawn without saving N RNG states;
- loss terms are averaged over the processes when they are read (every ``log_every`` steps);
- only rank 0 validates, writes checkpoints and outputs, and logs progress.
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import distributed as dist
from torch import nn

from genai_models.base import GenerativeModel

log = logging.getLogger(__name__)

LAUNCHED = "WORLD_SIZE"  # set by torchrun in every process it starts


class DistributedError(RuntimeError):
    """Data-parallel training cannot start or its processes failed; the message says which and why."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the training processes (the single-process default: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that validates, checkpoints, logs and writes outputs."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This process's device: its own GPU (LOCAL_RANK) on CUDA."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.active else device

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a global batch (B, ...) -> (B / world_size, ...)."""
        if not self.active:
            return batch
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size:(self.rank + 1) * size]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the processes (every process must call it at the same point)."""
        if not self.active:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total / self.world_size

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.active:
            dist.barrier()

    def step_seed(self, seed: int, step: int) -> int:
        """Seed of the random draws inside training step ``step`` on this process."""
        return (seed * 1_000_003 + step) * 1_009 + self.rank + 1

    def wrap_loss(self, model: GenerativeModel) -> Callable[[torch.Tensor], dict[str, torch.Tensor]] | None:
        """A DDP-wrapped ``model.loss`` to pass to ``training_step`` as ``loss_fn`` (None: single process)."""
        if not self.active:
            return None
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        # No buffer broadcast before every forward: the families that train data-parallel have no
        # running statistics (torch >= 2.13 names the switch forward_sync_buffers).
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})
        return ddp(_WeightedLoss(model, self.world_size), device_ids=device_ids, gradient_as_bucket_view=True,
                   **no_sync)


class _WeightedLoss(nn.Module):
    """What DDP runs forward: the family's loss on this process's share, weighted by the share's size.

    DDP averages gradients over the processes. That is the global batch's gradient when every
    share weighs the same (``loss_weight`` None: a mean over examples). Otherwise (the LM's mean
    over tokens) each process's terms are scaled by world_size * its weight / the total weight.
    """

    def __init__(self, model: GenerativeModel, world_size: int) -> None:
        super().__init__()
        self.model, self.world_size = model, world_size

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.model.loss(batch)
        weight = self.model.loss_weight(batch)
        if weight is None:
            return terms
        total = weight.detach().to(torch.float64).clone()
        dist.all_reduce(total)
        scale = (weight.to(torch.float64) * self.world_size / total).to(terms["loss"].dtype)
        return {name: value * scale for name, value in terms.items()}


def environment() -> DataParallel:
    """This process's rank, world size and local rank from the torchrun environment (1 process without it)."""
    try:
        return DataParallel(int(os.environ.get("RANK", "0")), int(os.environ.get(LAUNCHED, "1")),
                            int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as err:
        raise DistributedError(f"bad torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK): {err}") from None


@contextmanager
def process_group(device: torch.device) -> Iterator[DataParallel]:
    """Join the torchrun processes for the duration (NCCL on CUDA, gloo on CPU); one process: no-op.

    Once per process: torchrun's rendezvous does not take a second group after the first is
    destroyed. A process group someone else started (a script training several families) is used
    and left alone.
    """
    parallel = environment()
    if not parallel.active or dist.is_initialized():
        yield parallel
        return
    if device.type == "cuda":
        torch.cuda.set_device(parallel.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not parallel.is_main:  # one progress log, from rank 0; warnings and errors from everyone
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield parallel
    finally:
        dist.destroy_process_group()


def processes(setting: int | str, device: torch.device, key: str) -> int:
    """How many processes ``distributed: setting`` means on ``device``; errors name the params key."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if setting == "all":
        if not gpus:
            raise DistributedError(f"{key}: 'all' means one process per GPU, and no CUDA GPU is visible; "
                                   "give a number of processes to train data-parallel on the CPU")
        return gpus
    if device.type == "cuda" and int(setting) > gpus:
        raise DistributedError(f"{key}: {setting} processes (one per GPU) but only {gpus} GPU(s) are visible "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return int(setting)


def launch_command(num_processes: int, cli_args: list[str]) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``, this interpreter) running ``flows.cli cli_args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
            "-m", "flows.cli", *cli_args]


def launch(num_processes: int, cli_args: list[str]) -> None:
    """Run ``python -m flows.cli cli_args`` on ``num_processes`` processes; raise if any of them fails."""
    command = launch_command(num_processes, cli_args)
    log.info("data-parallel: %d processes: %s", num_processes, " ".join(command))
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise DistributedError(f"data-parallel training failed: torchrun exited with {returncode} "
                               f"(`{' '.join(command)}`; the processes' errors are above)")
