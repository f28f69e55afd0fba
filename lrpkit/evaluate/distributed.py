"""Devices and processes for :func:`~lrpkit.evaluate.runner.run_evaluation`: :func:`resolve_device` (a device
name checked against this machine), ``_Dist`` (the ``torch.distributed`` process group of a ``torchrun`` launch, or
a single process: rank, world size, gather, broadcast, barrier) and :func:`shard` (a rank's share of the images).
"""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "shard"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device named ``device``, checked to exist on this machine.

    ``"auto"`` (or None) is ``cuda`` when CUDA is available, else ``cpu``. Under ``torchrun`` (``WORLD_SIZE`` > 1)
    a CUDA device without an index becomes ``cuda:LOCAL_RANK``. Raises ``ValueError`` naming the problem and the
    fix for a name torch does not know, a device type that is not available, or an index beyond the device count.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ValueError(f"device {str(dev)!r} is not available on this machine (torch.{dev.type}.is_available() "
                         f"is False); use --device cpu (or auto)")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return dev


class _Dist:
    """The default process group when one exists or ``WORLD_SIZE`` > 1 (``torchrun``), else a single process
    (rank 0 of 1). Initialises gloo (CPU) or nccl (CUDA) unless a group already exists; destroys only a group it
    created."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.rank, self.world, self.owned = 0, 1, False
        joined = dist.is_available() and dist.is_initialized()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not joined:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = joined = True
        if joined:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_gather(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


def shard(items: list, rank: int, world: int) -> list:
    """The share of ``rank`` among ``world`` processes: items at positions p with p mod world == rank.

    Example: ``shard([a, b, c, d, e], 1, 2) == [b, d]``.
    """
    return list(items[rank::world])
