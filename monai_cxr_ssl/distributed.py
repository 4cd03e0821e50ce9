"""torch.distributed for the bundle's stages under ``torchrun``: the process group, the wrapped network, and the
collectives the stages need (gathering rows in their dataset order, gathering embeddings with their gradient).

Every function works in one process too (no process group: rank 0 of 1), so that the handlers that call them need
no second code path. ``multi_gpu.json`` (the bundle's overlay) calls :func:`init_process_group` and
:func:`data_parallel`; see docs/distributed.md.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad", "average_buffers", "barrier", "check_backend", "data_parallel", "destroy_process_group",
    "gather_in_order", "init_process_group", "is_distributed", "is_main_process", "local_device",
    "main_process_first", "rank", "unwrap", "world_size",
]

logger = logging.getLogger("monai_cxr_ssl")

BACKENDS = ("auto", "nccl", "gloo")

# no buffer broadcast at every forward: torch 2.13 renamed broadcast_buffers (deprecated, with a FutureWarning)
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel)
                           .parameters else {"broadcast_buffers": False})
# the DDP wrappers data_parallel made, whose reducers destroy_process_group lets go of first (see there)
_WRAPPERS: weakref.WeakSet = weakref.WeakSet()


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK`` (before the group starts), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """The number of processes: the process group's, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the process that writes files, checkpoints, MLflow runs and progress bars."""
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is there (the GPU of this process on its node; ``RANK`` would be wrong on
    every node but the first), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` for a backend that is not one of ``BACKENDS`` or cannot run here (NCCL without CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed_backend {backend!r}: use one of {BACKENDS}.")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("distributed_backend 'nccl' needs CUDA, and PyTorch sees no GPU here; use 'gloo' (or "
                         "'auto', which picks gloo without CUDA).")


def init_process_group(backend: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...) and return this
    process's device (:func:`local_device`).

    ``backend="auto"`` is NCCL with CUDA, else gloo. Ranks other than 0 log warnings and errors only (rank 0
    reports progress), and on Linux the process is told to stop when its launcher dies (a launcher
    killed with SIGKILL cannot stop its workers itself). Does nothing more when the group is already there.
    """
    check_backend(backend)
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(f"multi_gpu.json needs the environment torchrun sets ({', '.join(missing)} missing): start "
                         "it with `torchrun --nproc_per_node=N -m monai.bundle run ...` or `monai-cxr-ssl run ... "
                         "--nproc-per-node N`.")
    device = local_device()
    if not dist.is_initialized():
        _stop_with_launcher()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from datetime import timedelta

        chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        dist.init_process_group(backend=chosen, timeout=timedelta(seconds=timeout_s))
        if rank() > 0:
            _quiet_logging()
        logger.info("process group: %s, %d processes, this is rank %d on %s", chosen, world_size(), rank(), device)
    return device


def _stop_with_launcher() -> None:
    """Ask Linux to send SIGTERM to this process when its parent (torchrun's agent) dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _quiet_logging() -> None:
    """Drop INFO and DEBUG records in this process (also of loggers made later; the loggers' levels stay, which
    MONAI's StatsHandler checks): rank 0 reports progress, the other ranks warnings and errors."""
    logging.disable(logging.INFO)


def destroy_process_group() -> None:
    """Leave the process group at the end of a run (all ranks together), if there is one.

    The DDP wrappers made by :func:`data_parallel` let go of their reducers first. A reducer holds the process group
    too; freed later (when the wrapper is garbage), it would hold the last reference and destroy the gloo group with
    the GIL held, whose worker thread may at that moment need the GIL to free a finished all-reduce: a deadlock at
    exit. Freed here, while the group is still registered, it is not the last holder; ``dist.destroy_process_group``
    then frees the group, releasing the GIL as it does. The wrappers cannot train afterwards.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    for wrapper in list(_WRAPPERS):
        for name in ("logger", "reducer"):  # the logger holds the reducer
            wrapper.__dict__.pop(name, None)
    _WRAPPERS.clear()
    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; nothing in one process."""
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may write a file, the split), the other ranks after it (they read it).

    When the block raises on rank 0 the others keep waiting until torchrun stops them (it stops every rank when one
    fails): they must not run the block in its place. Usable as a decorator.
    """
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def data_parallel(module: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` on ``device`` (the bundle's ``network``), or as it is in one process.

    BatchNorm becomes ``SyncBatchNorm`` with NCCL only (it has no CPU kernels). Without it each rank's running
    statistics would follow its own images: the wrapper then averages them over the ranks after every training
    forward (:func:`average_buffers`), so that every rank holds the same model at all times (the EMA teacher made
    from it, the validation, rank 0's checkpoint). Buffers are never broadcast at a forward
    (``forward_sync_buffers=False``, ``broadcast_buffers=False`` before torch 2.13): evaluation forwards, of which the
    ranks may run different numbers (unpadded shares), stay free of collectives.
    """
    device = torch.device(device) if device is not None else local_device()
    module = module.to(device)
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    nccl = dist.get_backend() == "nccl"
    if nccl:  # the running statistics are those of the whole batch on every rank
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    wrapped = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)
    if not nccl:
        wrapped.register_forward_hook(_average_after_training_forward)
    _WRAPPERS.add(wrapped)
    return wrapped


def _average_after_training_forward(module: torch.nn.Module, inputs: Any, output: Any) -> None:
    if module.training:
        average_buffers(module)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; ``module`` otherwise."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return module.module if isinstance(module, wrappers) else module


def average_buffers(module: torch.nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm's running statistics) of ``module`` over the ranks, in place.

    With plain BatchNorm under DDP the ranks' running statistics drift apart (each sees its own images); averaged
    they are the same on every rank, so that an EMA teacher, the validation and rank 0's checkpoint are the model
    of every rank. Integer buffers (batch counters) are equal on every rank already.
    """
    if not is_distributed():
        return
    owners = [(m, name, b) for m in unwrap(module).modules() for name, b in m._buffers.items()
              if b is not None and b.is_floating_point()]
    if not owners:
        return
    flat = torch.cat([b.detach().reshape(-1) for _, _, b in owners])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for m, name, b in owners:  # new tensors, not copy_(): autograd saved the old ones for the pending backward
        m._buffers[name] = flat[offset: offset + b.numel()].view_as(b)
        offset += b.numel()


def gather_in_order(rows: np.ndarray | Sequence[Any]) -> np.ndarray | list[Any]:
    """All ranks' ``rows`` in the order of the dataset they were drawn from, on every rank.

    The evaluation loaders split a dataset of n items with MONAI's ``DistributedSampler(even_divisible=False,
    shuffle=False)``: rank r holds items r, r + W, r + 2W ... (no padding, so no duplicates). Item j is therefore
    row j // W of rank j % W; interleaving the ranks' rows undoes the split (MONAI's ``evenly_divisible_all_gather``
    concatenates them rank after rank instead). One process: ``rows`` as they are.
    """
    if not is_distributed():
        return rows
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, rows)
    total = sum(len(p) for p in parts)
    order = [(j % len(parts), j // len(parts)) for j in range(total)]
    if isinstance(rows, np.ndarray):
        return np.stack([parts[r][i] for r, i in order]) if total else rows[:0]
    return [parts[r][i] for r, i in order]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather in forward; in backward, the sum over ranks of the gradients of the gathered tensor, of which each
    rank keeps its own slice (every rank's loss depends on every rank's rows)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.rank, ctx.n = dist.get_rank(), len(x)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n: (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (N, ...) concatenated in rank order (W·N, ...), differentiable with respect to this rank's.

    For losses over all ranks' embeddings (contrastive negatives). The backward pass all-reduces (sums) the
    gradients, so that with DDP's gradient averaging one step equals the one-process step on the whole batch (the
    old ``GatherLayer``, which keeps only the local gradient, does not; ``torch.distributed.nn``'s differentiable
    all_gather is deprecated). Every rank must pass the same N. One process: ``x`` itself.
    """
    if not is_distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    if len({int(s) for s in sizes}) > 1:
        raise ValueError(f"all_gather_with_grad needs the same batch size on every rank, got "
                         f"{[int(s) for s in sizes]}; "
                         "use a training sampler that gives every rank as many items (drop_last).")
    return _GatherWithGrad.apply(x)
