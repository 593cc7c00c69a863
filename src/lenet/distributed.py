"""Data-parallel training under torchrun: the process group, data shards, and rank-0 duties.

`torchrun --nproc-per-node N -m lenet train ...` starts N copies of `lenet train` with RANK,
WORLD_SIZE and LOCAL_RANK in their environment. The entry point calls ``init_from_environment``
once (it also picks each rank's device) and passes the result down to ``train``; nothing here
runs at import.

The contract the training loop keeps with these helpers:
- every rank derives the same permutation of the training split for an epoch
  (``epoch_order``) and takes its share of each global batch (``Distributed.shard``), so
  ``--batch-size`` is the global batch whatever the number of processes;
- rank 0 alone touches the run folder; other ranks learn what it found (``on_main``);
- any collective is reached by every rank in the same order, or the group would hang.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lenet.device import resolve_device
from lenet.errors import ConfigError, LenetError

T = TypeVar("T")

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting its variables) started."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files or prints progress."""
        return self.rank == 0

    def shard(self, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's part of one global batch, and the factor that weights its mean loss.

        DDP averages gradients over ranks. Scaling each rank's mean loss by
        ``len(part) * world_size / len(index)`` makes that average the gradient of the global
        batch's mean loss even when the batch does not split evenly (the last one of an epoch).
        A rank left without samples runs one sample with weight 0, because every rank must
        take part in the gradient all-reduce.
        """
        part = index.tensor_split(self.world_size)[self.rank]
        if len(part) == 0:
            return index[:1], 0.0
        return part, len(part) * self.world_size / len(index)

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum_counts(self, running: dict[str, Any]) -> dict[str, Any]:
        """The epoch's running loss, correct and seen summed over ranks (seconds: rank 0's)."""
        keys = ("loss", "correct", "seen")
        totals = torch.tensor([float(running[k]) for k in keys], dtype=torch.float64)
        totals = totals.to(self.device)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        summed = totals.cpu().tolist()
        return {
            **running,
            "loss": summed[0],
            "correct": int(summed[1]),
            "seen": int(summed[2]),
        }

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, device=self._object_device)
        return holder[0]  # type: ignore[return-value]

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics).

        DDP sends rank 0's buffers to the others before each forward pass, and then each rank
        updates them on its own shard: after the last step they differ. Shared at the end,
        every rank holds the model rank 0 saves.
        """
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0; None on the others."""
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Leave the group; safe to call twice."""
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _object_device(self) -> torch.device | None:
        # NCCL moves pickled objects through GPU memory; gloo through host memory.
        return self.device if self.device.type == "cuda" else None


def init_from_environment(device_name: str = "auto") -> Distributed | None:
    """Join the torchrun group if this process was started by torchrun; else None.

    The device is chosen here, once: ``cuda:LOCAL_RANK`` with NCCL when CUDA is asked for (or
    ``auto`` finds it), else the CPU with gloo.
    """
    if not launched_by_torchrun():
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "mps":
        raise ConfigError(
            "torchrun training runs on CUDA (NCCL) or the CPU (gloo), not on MPS: "
            "pass --device cpu, or train without torchrun."
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                f"torchrun started local rank {local_rank}, but this machine has {count} CUDA "
                f"GPU(s): use --nproc-per-node {count} or fewer, or --device cpu."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Distributed(rank, world, local_rank, device, backend)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``n`` training images for ``epoch``: the same on every rank.

    Seeded by ``seed + epoch``, as torch's DistributedSampler does, so any rank can compute
    the order of any epoch (after a resume, too) without carrying generator state around.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def augment_seed(seed: int, rank: int) -> int:
    """The seed of a rank's augmentation stream: rank 0 gets ``seed``, the others their own."""
    return seed + 1_000_003 * rank


def on_main(distributed: Distributed | None, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and give its result (or its LenetError) to every rank.

    Without a group, simply ``work()``. Errors are passed on so that every rank stops with
    the same message instead of waiting forever for a rank that gave up.
    """
    if distributed is None:
        return work()
    result: Any = None
    error: BaseException | None = None
    if distributed.is_main:
        try:
            result = work()
        except (LenetError, OSError) as exc:
            error = exc
    result, error = distributed.broadcast((result, error))
    if error is not None:
        raise error
    return result


def main_first(distributed: Distributed | None, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0, then on the other ranks (a download or cache fill done once)."""
    if distributed is None:
        return work()
    result: Any = None

    def first() -> None:
        nonlocal result
        result = work()

    on_main(distributed, first)  # the others wait here until rank 0 is done (or failed)
    return result if distributed.is_main else work()


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor in ``model.state_dict()`` (names, shapes, bytes), on the CPU."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
