"""torch.distributed plumbing for `torchrun --nproc_per_node=N run_experiment.py ...` (layer 1: torch only).

One process per rank; every rank runs the same code on the same global batches and trains on its own slice
of each (`shard`), DistributedDataParallel averages the gradients, so the global batch and the batch order
are those of the single-process run. Rank 0 alone writes files (results_io's writers check `is_main`).
Without WORLD_SIZE > 1 in the environment every helper is a no-op and nothing is imported from torch.distributed.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one process that writes results, checkpoints and plots."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "auto") -> int:
    """Join the process group `torchrun` describes in the environment (WORLD_SIZE > 1): NCCL when the run
    uses CUDA (`device` auto with a GPU, or cuda), gloo on CPU. Non-main ranks print nothing to stdout.
    -> the world size (1: not distributed, nothing done)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or _dist():
        return world_size()
    import torch.distributed as dist
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() < 1:
            raise ValueError("device='cuda' under torchrun but no CUDA device is visible; use --device cpu (gloo)")
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # one copy of every table and progress line (errors still show)
    return world_size()


def refuse_torchrun(script: str) -> None:
    """For the runners that run in one process: refuse (ValueError, one line) to start under torchrun, where
    WORLD_SIZE > 1 processes would each run the whole job and write the same files."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        raise ValueError(f"{script} runs in one process, but WORLD_SIZE={size} (torchrun); start it with python "
                         f"(the experiments of run_experiment.py and run_comprehensive_ablations.py run under torchrun)")


def shutdown() -> None:
    dist = _dist()
    if dist:
        dist.destroy_process_group()


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache, deletes stale runs), the others after it, so they
    find what it made instead of racing it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def check_batch(batch_size: int) -> None:
    """Refuse a global batch the ranks cannot split evenly (the loss would no longer be the global mean)."""
    size = world_size()
    if batch_size % size:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {size} torchrun processes; use a "
                         f"multiple of {size} (the global batch is split evenly across ranks)")


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (B, ...) -> (B / world, ...): a contiguous slice."""
    size = world_size()
    if size == 1:
        return batch
    check_batch(batch.shape[0])
    per = batch.shape[0] // size
    return batch[rank() * per: (rank() + 1) * per]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (returned for chaining); the identity in a single process."""
    dist = _dist()
    if dist and tensor.numel():
        dist.all_reduce(tensor)
    return tensor
