"""Data-parallel training over several processes (DistributedDataParallel).

Launch with `torchrun --nproc-per-node N -m lmforge train ...`: torchrun starts N copies of the
command and sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in each one's environment.
Every process holds a full copy of the model and draws its own batches (its data seed is offset
by its rank); after each backward pass DDP averages the gradients over the processes, so every
copy takes the same optimizer step, as if one process had trained on all N batches at once.
Process groups use gloo on CPU and nccl on CUDA. Only rank 0 writes logs and checkpoints.

With `fsdp=true` the model is sharded instead of copied (FSDP2, `fully_shard`): each process
keeps 1/N of every parameter, gradient and AdamW state, and a layer's full weights exist only
while that layer runs. Checkpoints are gathered into ordinary, unsharded files.

Without those environment variables (a plain `lmforge train`) every function here is a no-op
answering "one process, rank 0"."""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import Any, Callable, Iterator

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


def wrap(model: torch.nn.Module, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """The module to call for training steps: DDP around `model` when distributed (it
    broadcasts rank 0's weights now and averages gradients during backward), `model` itself
    sharded in place with `fsdp`, else `model`."""
    if not is_distributed():
        return model
    if fsdp:
        return shard(model, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Our buffers (RoPE tables, sinusoids) are constants: no need to broadcast them each step.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               forward_sync_buffers=False)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 in place: every layer of every ModuleList (GPT's blocks, the seq2seq stacks) becomes
    its own unit, gathered just before it runs and freed after; the rest (embeddings, final
    norm, the tied head) forms the root unit. Units are made bottom-up, as fully_shard needs.
    Rank 0's weights are broadcast first, as DDP does, so every shard is cut from the same model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(device.type, (world_size(),))
    layers = [layer for m in model.modules() if isinstance(m, torch.nn.ModuleList) for layer in m]
    for layer in reversed(layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every weight of a sharded model whole on every rank for a while, for code that calls its
    submodules directly instead of `model(...)` (beam search calls the decoder step by step).
    Every rank must run the same calls, as all do with the same weights and inputs. A no-op
    for an unsharded model."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first
    for unit in units[1:]:  # the layers' own forward calls must not free them meanwhile
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units[1:]:
            unit.set_reshard_after_forward(True, recurse=False)  # as `shard` made them
        for unit in units:
            unit.reshard()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's full weights, gathered onto rank 0's CPU (every rank must call this;
    the others get an empty dict). None for an unsharded model: read it directly."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) weights, as a checkpoint holds them, into a sharded model: each
    rank cuts its own shard from the full tensor (every rank has read the file)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights once, as the file holds them
            if name not in state:
                raise LMForgeError(f"the checkpoint has no {name}; it does not match the model")
            full = state[name].to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
            else:
                p.copy_(full)
        for name, b in model.named_buffers():
            if name in state:
                b.copy_(state[name])


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer's state, gathered onto rank 0 and keyed by parameter name, for a sharded
    model (every rank calls); None for an unsharded one."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def no_sync(module: torch.nn.Module, skip: bool):
    """Context for a forward + backward whose gradients should only accumulate locally
    (all micro-batches but the last of a step); a no-op when not distributed."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: a switch, not a context
        module.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()
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


def from_main(make: Callable[[], Any]) -> Any:
    """`make()` run on rank 0 only, its (picklable) result handed to every rank: for work that
    must agree across processes and need not be repeated, such as training a tokenizer."""
    if not is_distributed():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
