"""Calibration on several processes with torch.distributed (``torchrun --nproc-per-node N``).

The one place that knows about ranks. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) the process group is started on first use: gloo when the model runs on the CPU,
nccl on CUDA (each rank on ``cuda:LOCAL_RANK``). Ranks take shares of the calibration batches,
and their fixed-point moment sums are all-reduced; every rank then holds the same moments, fits
the same directions (so sequential multi-layer calibration stays in step), and rank 0 alone runs
the held-out pass and writes. Without torchrun every function here is a no-op for one process.

Why integer sums (``calibrate.FixedPointScale``): float64 sums added in another order round
differently, so the adapter would depend on the number of processes. Integers add exactly in
any order, so 1 process, N processes and N shard files give the same bits.
"""

from __future__ import annotations

import atexit
import os

import torch

_backend: str | None = None


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return env_world_size() > 1


def setup(device: torch.device) -> None:
    """Start the process group for ``device`` (idempotent; nothing without torchrun)."""
    global _backend
    if not launched():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    _backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(_backend)
    atexit.register(_teardown)


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def rank() -> int:
    return env_rank() if active() else 0


def world_size() -> int:
    return env_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that measures held-out errors and writes."""
    return env_rank() == 0 if launched() else True


def device_for(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``)."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def share(count: int, part: int | None = None, parts: int | None = None) -> range:
    """The contiguous share ``part`` of ``parts`` (default: this rank of the world) of ``count`` items."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    return range(part * count // parts, (part + 1) * count // parts)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (integers, so exact and in any order). Nothing for one process."""
    if active():
        import torch.distributed as dist

        # gloo reduces CPU tensors, nccl CUDA ones: each tensor goes where the backend wants it.
        on = torch.device("cpu") if _backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
        if tensor.device == on:
            dist.all_reduce(tensor)
        else:
            moved = tensor.to(on)
            dist.all_reduce(moved)
            tensor.copy_(moved)
    return tensor
