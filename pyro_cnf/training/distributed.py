"""Data-parallel training on :mod:`torch.distributed`: process-group setup, ranks, the
per-step shard of a batch, and the reduction of metrics.

Every process of a run executes the same script; a launcher such as ``torchrun`` starts
them and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``::

    torchrun --standalone --nproc_per_node=4 -m pyro_cnf.demo --device cpu

:func:`setup` joins the process group (``gloo`` for a CPU device, ``nccl`` for CUDA) when
those variables are set and does nothing otherwise, so that the same code runs as one
plain process. The data scheme of :class:`~pyro_cnf.training.Trainer`: every rank computes
the same global batch of a step (a function of ``(seed, step)`` alone) and trains on its
own contiguous slice, :func:`shard`; DistributedDataParallel averages the gradients, so
``N`` ranks with ``B / N`` rows each take the step one process takes with all ``B`` rows.

Outside a process group every helper acts as the single process of a world of one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "backend_for",
    "setup",
    "teardown",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main",
    "shard",
    "all_reduce_sum",
    "all_reduce_mean",
    "all_gather_object",
    "broadcast_object",
    "barrier",
    "rank_random_stream",
]

#: The environment variables a launcher sets for every process.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def backend_for(device: torch.device | str) -> str:
    """The collective backend for tensors on ``device``: ``nccl`` for CUDA, else ``gloo``.

    Example:
        >>> backend_for("cpu"), backend_for("cuda:1")
        ('gloo', 'nccl')
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def setup(device: torch.device | str | None = None) -> torch.device:
    """Join the process group when launched by ``torchrun`` (or anything that sets
    :data:`LAUNCH_VARIABLES`); return the device this process should train on.

    ``device`` defaults to CUDA when available, else the CPU. A CUDA device without an
    index becomes ``cuda:LOCAL_RANK``, one GPU per process on each node; an explicit index
    is kept. Without the launch variables nothing is initialised (one plain process).

    Example:
        >>> setup("cpu"), is_distributed()  # not launched: a world of one
        (device(type='cpu'), False)
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not all(name in os.environ for name in LAUNCH_VARIABLES):
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device))
    return device


def teardown() -> None:
    """Leave the process group, if this process is in one (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, ``0`` outside a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes, ``1`` outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, figures and logs."""
    return get_rank() == 0


def shard(batch: Tensor, *, even: bool = True, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """This rank's contiguous slice of the rows of ``batch`` (shape ``(B, ...)``).

    The slices of ranks ``0, ..., N - 1`` concatenate back to ``batch``. With ``even`` (for
    training: DDP averages the ranks' gradients, which is the gradient of the global mean
    only when every rank holds as many rows) ``B`` must be a multiple of ``N``; otherwise
    the first ``B mod N`` ranks take one row more (for evaluating sums).

    Arguments:
        batch: The global batch, the same on every rank.
        even: Require equal slices.
        rank, world_size: Default this process's :func:`get_rank` and :func:`get_world_size`.

    Returns:
        Shape ``(B / N, ...)`` (a view).

    Example:
        >>> x = torch.arange(6).reshape(6, 1)
        >>> shard(x, rank=1, world_size=3).flatten().tolist(), shard(x).shape  # world of one: all
        ([2, 3], torch.Size([6, 1]))
        >>> shard(torch.arange(5), even=False, rank=1, world_size=2).tolist()
        [3, 4]
    """
    world = get_world_size() if world_size is None else world_size
    index = get_rank() if rank is None else rank
    if not 0 <= index < world:
        raise ValueError(f"expected 0 <= rank < world_size, got rank={index}, world_size={world}")
    n = batch.shape[0]
    if even and n % world:
        raise ValueError(
            f"the global batch of {n} rows does not split evenly over {world} processes; "
            f"choose a batch size that is a multiple of {world}"
        )
    return torch.tensor_split(batch, world)[index]


def all_reduce_sum(values: Tensor) -> Tensor:
    """The sum over ranks of ``values`` (any shape, on a device of the group's backend), a
    new tensor; a copy outside a process group.

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    total = values.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_mean(values: Tensor) -> Tensor:
    """The mean over ranks of ``values`` (floating point), a new tensor.

    Example:
        >>> all_reduce_mean(torch.tensor(3.0))
        tensor(3.)
    """
    return all_reduce_sum(values) / get_world_size()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` outside a
    process group.

    Example:
        >>> all_gather_object({"seed": 0})
        [{'seed': 0}]
    """
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself outside a process group.

    Example:
        >>> broadcast_object("only rank 0 knows")
        'only rank 0 knows'
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing to wait for outside a process group)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":  # else NCCL guesses the device and warns
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def rank_random_stream(device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside, torch's global random stream (CPU, and ``device`` if CUDA) is this rank's
    own; after, it is back where it was, one draw further.

    Ranks keep the stream outside in lockstep (seeded alike, drawing alike), so that one
    rank's checkpointed random state resumes them all. Random numbers drawn per rank, such
    as the Hutchinson and RNODE probes of each rank's slice, must differ between ranks
    instead, or every rank would reuse the same probes: one draw of the shared stream,
    offset by the rank, seeds the stream inside. Outside a process group this does nothing.

    Example:
        >>> with rank_random_stream():  # a world of one: the shared stream itself
        ...     a = torch.rand(1)
        >>> a.shape
        torch.Size([1])
    """
    if not is_distributed():
        yield
        return
    device = torch.device(device)
    seed = int(torch.randint(2**62, ()))  # the same on every rank
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + get_rank())
        yield
