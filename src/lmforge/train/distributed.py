"""Data-parallel training over several processes (DistributedDataParallel).

Launch with `torchrun --nproc-per-node N -m lmforge train ...`: torchrun starts N copies of the
command and sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in each one's environment.
Every process holds a full copy of the model and draws its own batches (its data seed is offset
by its rank); after each backward pass DDP averages the gradients over the processes, so every
copy takes the same optimizer step, as if one process had trained on all N batches at once.
Process groups use gloo on CPU and nccl on CUDA. Only rank 0 writes logs and checkpoints.

Without those environment variables (a plain `lmforge train`) every function here is a no-op
answering "one process, rank 0"."""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LMForgeError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """The rank torchrun gave this process, readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def setup(device: torch.device) -> torch.device:
    """Join the process group if torchrun started us (once); returns the device this rank uses
    (cuda:LOCAL_RANK on a GPU machine, so each process drives its own GPU)."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend)
        except (RuntimeError, ValueError) as e:
            raise LMForgeError(f"could not join the {backend} process group ({e}); "
                               f"launch with torchrun --nproc-per-node N") from None
        atexit.register(cleanup)  # whichever command trained, leave the group cleanly
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to call for training steps: DDP around `model` when distributed (it
    broadcasts rank 0's weights now and averages gradients during backward), else `model`."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Our buffers (RoPE tables, sinusoids) are constants: no need to broadcast them each step.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               forward_sync_buffers=False)


def no_sync(module: torch.nn.Module, skip: bool):
    """Context for a forward + backward whose gradients should only accumulate locally
    (all micro-batches but the last of a step); a no-op when not skipping or not DDP."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The average of a tensor over all processes (itself when not distributed)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any process, e.g. Ctrl-C seen by one of them."""
    if not is_distributed():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (e.g. each rank's data position)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
