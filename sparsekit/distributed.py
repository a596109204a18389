"""Distributed calibration: ranks split the calibration windows and sum their statistics.

Every statistic sparsekit collects is a sum over tokens (sum x^2, sum |x|, X^T X, token counts), so with
``torchrun --nproc-per-node N sparsekit prune ...`` each rank replays the model over its share of the
windows and the sums are all-reduced after each decoder layer; every rank then computes the same masks and
weight updates, and feeds its own windows through the pruned layer. The result equals the single-process
run up to float rounding (sums added in another order). Backend: NCCL when the model is on CUDA, else gloo.

Only rank 0 prints progress and writes the output folder.
"""

from __future__ import annotations

import os
import zlib

import torch

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "shard", "all_reduce_sum_", "barrier",
           "all_reduce_stats_"]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...).

    Returns (rank, world_size); (0, 1) when not launched by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not torch.distributed.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def device_for_rank(device: str) -> str:
    """The device this rank loads the model on. Under torchrun on GPUs, ``cuda`` means this rank's GPU
    (LOCAL_RANK, the one NCCL uses); an explicit ``cuda:N`` is refused, as every rank would load onto GPU N.
    Unchanged in one process and on CPU."""
    device = str(device)
    if world_size() <= 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(f"--device {device} under torchrun with {world_size()} processes would put every rank "
                         "on that one GPU; pass --device cuda (each rank takes the GPU of its LOCAL_RANK)")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the rows of ``windows`` (round-robin). Raises if a rank would get none."""
    w = world_size()
    if w == 1:
        return windows
    if windows.shape[0] < w:
        raise ValueError(f"{windows.shape[0]} calibration windows cannot be split over {w} ranks; "
                         "give --nsamples >= the number of processes")
    return windows[rank()::w]


def _all_reduce_(t: torch.Tensor, op) -> torch.Tensor:
    """All-reduce ``t`` in place. NCCL takes only CUDA tensors: a CPU tensor (a scalar sum) goes through the
    current CUDA device there."""
    if t.device.type != "cuda" and torch.distributed.get_backend() == "nccl":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(buf, op=op)
        t.copy_(buf)
    else:
        torch.distributed.all_reduce(t, op=op)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place."""
    if is_distributed():
        _all_reduce_(t, torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_min_max(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) over all ranks of a one-element tensor."""
    low, high = t.clone(), t.clone()
    if is_distributed():
        _all_reduce_(low, torch.distributed.ReduceOp.MIN)
        _all_reduce_(high, torch.distributed.ReduceOp.MAX)
    return float(low), float(high)


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_stats_(stats: dict) -> None:
    """Sum every distinct LinearStats of ``stats`` (shared groups once) over all ranks, in place."""
    if not is_distributed():
        return
    # Pair the ranks' statistics by layer name, never by the order the hooks fired on each rank: check that
    # every rank has the same layers, grouped the same way, then reduce in name order.
    names = sorted(stats)
    layout = "|".join(f"{n}:{names.index(next(m for m in names if stats[m] is stats[n]))}" for n in names)
    digest = torch.tensor([zlib.crc32(layout.encode())], dtype=torch.float64)
    low, high = all_reduce_min_max(digest)
    if low != high:
        raise RuntimeError("distributed calibration: the ranks collected statistics for different linear layers "
                           "(or grouped them differently), so their sums cannot be paired; every rank must run "
                           "the same model on windows that reach the same layers")
    seen = set()
    for name in names:
        st = stats[name]
        if id(st) in seen:
            continue
        seen.add(id(st))
        for name in ("sq_norm", "xtx", "abs_sum"):
            t = getattr(st, name, None)
            if t is not None:
                all_reduce_sum_(t)
        n = torch.tensor([st.tokens], dtype=torch.float64, device=st.sq_norm.device)
        st.tokens = int(all_reduce_sum_(n).item())
