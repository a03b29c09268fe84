"""The process group: joining it from torchrun's environment, collectives that fail clearly, replicas.

:func:`init_distributed` joins the group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and returns where this process stands; without that environment it
returns a single process, and everything built on this module then runs without collectives.
Every collective goes through :func:`collective`, so a dead or stuck peer becomes an error that
names this rank and what it was doing, within the group's timeout, rather than a hang.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo", "init_distributed", "shutdown_distributed", "world", "collective", "global_rank", "comm_device",
    "all_gather_tensor", "reduce_scatter_tensor", "broadcast_tree", "replica_checksum", "assert_replicas_equal",
    "on_rank_0", "RankFailed",
]

PyTree = Any
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old names.
all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class DistInfo(NamedTuple):
    """Where this process stands in the job."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # processes in the job (1 without a process group)
    local_rank: int  # rank on this machine (picks the GPU)
    device: torch.device  # cuda:<local_rank> under NCCL, else cpu

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0


def init_distributed(*, backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment (single process without one).

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. NCCL is chosen when CUDA is
    available (each rank then owns ``cuda:<LOCAL_RANK>``), gloo otherwise. ``timeout_s`` bounds the
    rendezvous (a rank that never joins makes the others fail, not wait) and every collective (gloo
    raises; NCCL's watchdog aborts the process). Calling it again returns the same answer.

    Args:
        backend: "nccl" or "gloo"; None chooses as above.
        timeout_s: seconds before a missing rank or a stuck collective is an error.

    Returns:
        DistInfo(rank, world_size, local_rank, device).

    Example:
        >>> info = init_distributed()  # python train.py: DistInfo(rank=0, world_size=1, ...)
        >>> info.world_size
        1
    """
    if not timeout_s > 0:
        raise ValueError(f"init_distributed: timeout_s must be > 0 seconds, got {timeout_s!r}.")
    if dist.is_available() and dist.is_initialized():
        return _info(backend=dist.get_backend())
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"init_distributed: WORLD_SIZE is set but {missing} are not; launch with torchrun "
            "(e.g. `torchrun --nproc_per_node=2 -m functional_memopt train ...`), which sets them all."
        )
    if not dist.is_available():
        raise RuntimeError("init_distributed: this torch build has no torch.distributed; install a build with it.")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"init_distributed: backend must be 'nccl' or 'gloo', got {backend!r}.")
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    kwargs: dict = {}
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"init_distributed: LOCAL_RANK {local} needs GPU {local}, but this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per node."
            )
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)  # connects now, so a bad setup fails here
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except RuntimeError as err:  # DistStoreError, DistNetworkError, ... are RuntimeErrors
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise RuntimeError(
            f"init_distributed: rank {rank} of {size} could not join the process group at {where} within "
            f"{timeout_s:g} s ({err}). Check that all {size} ranks were started, that MASTER_ADDR and "
            "MASTER_PORT reach rank 0's machine, and that the port is free."
        ) from err
    return _info(backend=backend)


def _info(*, backend: str) -> DistInfo:
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def shutdown_distributed() -> None:
    """Leave the process group, if any (call once at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group); ``(0, 1)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("world: a group was given but no process group exists; call init_distributed() first.")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def collective(caller: str, what: str, fn: Callable, *args, **kwargs):
    """Run one collective; a dead or stuck peer becomes an error naming this rank and the step."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        rank, size = world(kwargs.get("group"))
        raise RuntimeError(
            f"{caller}: {what} failed on rank {rank} of {size} ({err}). Another rank probably died, was "
            "stopped or is stuck (the collective timeout is init_distributed's timeout_s); see its log."
        ) from err


class RankFailed(Exception):
    """Another rank failed and reported why; this rank stops too, with nothing more to say."""


def on_rank_0(fn: Callable[[], Any], *, what: str, group=None, caller: str = "on_rank_0") -> Any:
    """Run ``fn`` on rank 0 only; every rank learns whether it worked (one broadcast in a group).

    Without it, a failure on rank 0 (an existing run directory, a full disk) would leave the other
    ranks waiting in their next collective until the timeout.

    Args:
        fn: the work of rank 0 (e.g. writing a file).
        what: a few words for the other ranks' error ("preparing the run directory").
        group: the process group (None: the default one; without any, a single process).
        caller: the name at the start of error messages.

    Returns:
        ``fn()`` on rank 0, None elsewhere. Rank 0 re-raises its own error; the others raise
        :class:`RankFailed`.

    Example:
        >>> on_rank_0(lambda: os.makedirs("runs/demo", exist_ok=True), what="making the folder")  # doctest: +SKIP
    """
    rank, size = world(group)
    result, failure = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # the other ranks must hear of it first
            failure = err
    if size > 1:
        flag = torch.tensor([failure is None], dtype=torch.int64, device=comm_device(group))
        collective(caller, f"the outcome of {what}", dist.broadcast, flag, src=global_rank(0, group), group=group)
        if failure is None and not bool(flag):
            raise RankFailed(f"{caller}: rank 0 failed while {what}; see its error.")
    if failure is not None:
        raise failure
    return result


def global_rank(rank: int, group) -> int:
    """The global rank of ``group``'s rank ``rank`` (collectives name their source and target globally)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def comm_device(group) -> torch.device:
    """Where ``group``'s collectives need their tensors: this rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def broadcast_tree(tree: PyTree, *, src: int = 0, group=None) -> PyTree:
    """A copy of rank ``src``'s ``tree`` on every rank (one broadcast per dtype); pure.

    Every rank passes a tree of the same structure, shapes and dtypes (e.g. params made from the
    same config); only the values of ``src`` matter.
    """
    rank, size = world(group)
    if size == 1:
        return tree
    leaves, spec = optree.tree_flatten(tree)
    out = list(leaves)
    for dtype in sorted({x.dtype for x in leaves}, key=str):
        idx = [i for i, x in enumerate(leaves) if x.dtype == dtype]
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        collective("broadcast_tree", "the broadcast", dist.broadcast, flat, src=global_rank(src, group), group=group)
        for i, v in zip(idx, flat.split([leaves[i].numel() for i in idx])):
            out[i] = v.view(leaves[i].shape)
    return optree.tree_unflatten(spec, out)


def replica_checksum(tree: PyTree) -> torch.Tensor:
    """A (2,) int64 checksum of the bits of every tensor leaf: equal trees give equal sums.

    Sums the leaves' bit patterns as integers, plainly and weighted by position, so a changed bit
    or two swapped values change it; wrapping int64 arithmetic keeps it exact and deterministic.
    """
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    total = torch.zeros(2, dtype=torch.int64)
    for x in optree.tree_leaves(tree):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            continue
        bits = x.detach().contiguous().reshape(-1)
        bits = (bits.view(ints[bits.element_size()]) if bits.is_floating_point() else bits).to(torch.int64)
        weight = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        total += torch.stack([bits.sum(), (bits * weight).sum()]).cpu()
    return total


def assert_replicas_equal(tree: PyTree, *, group=None, what: str = "params") -> None:
    """Raise on every rank if ``tree`` differs between ranks (one small all-gather of checksums).

    A debugging aid: ranks of a data-parallel run must hold bit-identical params.

    Raises:
        RuntimeError: naming the ranks whose checksum differs from rank 0's.
    """
    rank, size = world(group)
    if size == 1:
        return
    mine = replica_checksum(tree).to(comm_device(group))
    every = torch.empty(size * 2, dtype=torch.int64, device=mine.device)
    collective("assert_replicas_equal", "the checksum all-gather", all_gather_tensor, every, mine, group=group)
    every = every.view(size, 2).cpu()
    bad = [r for r in range(size) if not torch.equal(every[r], every[0])]
    if bad:
        raise RuntimeError(
            f"assert_replicas_equal: the {what} of ranks {bad} differ from rank 0's (checksums {every.tolist()}); "
            "the ranks started from different values or a step was not the same everywhere."
        )


