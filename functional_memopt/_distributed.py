"""Data parallel training on torch.distributed: process groups, batch shards, one gradient all-reduce.

Every rank holds the params, folds its own rows of the global batch into a float32 accumulator,
and once per optimizer step the accumulated gradients (with the loss sum and token count) go
through ONE all-reduce over a flat bucket (a few, when ``bucket_mb`` caps the bucket)::

    global tokens N = all_reduce(local tokens)            # a scalar, before the fold
    fold: grads of loss_sum * S / N over local micro-batches
    all_reduce(flat [grads, loss_sum, count])             # SUM; gloo has no AVG, 1/N is already in
    unscale; finite; clip; optimizer update                # the same values on every rank

Each rank differentiates ``loss_sum * S / N`` with the GLOBAL N, so the sum over ranks is the
gradient of the global mean loss whatever the ranks' token counts (ragged masks included), and the
non-finite check and loss-scale decision see the reduced gradients: all ranks skip or step together.

How a step is spread over ranks is a :class:`Parallelism`, a NamedTuple of pure functions: the
hooks a step calls (``count``, ``reduce``, ``summarize``, ``update``) and how its state is laid
out (``init``, ``gather``, ``shard``). :func:`replicated` is plain data parallelism (ZeRO stage 0);
``functional_memopt._zero`` adds optimizer-state (stage 1) and gradient (stage 2) sharding.

A process group is made by :func:`init_distributed` from torchrun's environment; without one
(``WORLD_SIZE`` unset) everything here runs as a single process.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.distributed as dist

from ._accumulate import Accumulated, accumulate_gradients
from ._data import split_microbatches
from ._grad import value_and_grad
from ._loss_scale import NoOpLossScale
from ._optim import GradientTransformation, apply_updates
from ._precision import get_policy, with_policy
from ._train import TrainState, batch_token_count, init_train_state, make_loss_fn
from ._tree import tree_all_finite, tree_global_norm

__all__ = [
    "DistInfo", "init_distributed", "shutdown_distributed", "world", "shard_batch", "Parallelism",
    "replicated", "all_reduce_accumulated", "broadcast_tree", "replica_checksum", "assert_replicas_equal",
    "init_data_parallel_state", "make_data_parallel_step",
]

PyTree = Any
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
            "(e.g. `torchrun --nproc_per_node=2 -m functional_memopt.cli train ...`), which sets them all."
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


def shard_batch(batch, rank: int, world_size: int):
    """This rank's rows of a global batch: the ``rank``-th of ``world_size`` near-equal row slices.

    Every rank builds the same global batch (e.g. ``sample_batch`` with the same seed and index)
    and keeps its slice, so a resumed or resized run sees the same data. Slices are views.

    Args:
        batch: a NamedTuple (e.g. Batch) of (B, ...) tensors or None.
        rank, world_size: from :func:`init_distributed`.

    Returns:
        A batch of the same type with rows ``tensor_split(B, world_size)[rank]``.

    Example:
        >>> from functional_memopt import Batch
        >>> shard_batch(Batch(torch.arange(6).view(3, 2), torch.zeros(3, 2)), 1, 2).tokens
        tensor([[4, 5]])
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"shard_batch: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}.")
    rows = {x.shape[0] for x in batch if isinstance(x, torch.Tensor)}
    if len(rows) != 1:
        raise ValueError(f"shard_batch: every field must have the same number of rows, got row counts {sorted(rows)}.")
    (B,) = rows
    if B < world_size:
        raise ValueError(
            f"shard_batch: the global batch has {B} rows for {world_size} ranks; each rank needs at least "
            "one row, so raise the batch size to a multiple of the world size."
        )
    return type(batch)(*(None if x is None else torch.tensor_split(x, world_size)[rank] for x in batch))


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


class Parallelism(NamedTuple):
    """How a training step spreads over ranks: step hooks and state layout, as pure functions.

    Step hooks, called by the step in this order:
        count(tokens) -> tokens: the global token count from this rank's (0-d float64).
        reduce(acc) -> acc: the fold's Accumulated summed over ranks (grads may become a shard).
        summarize(grads, loss_sum, count) -> (finite, grad_norm, loss_sum, count): global values of
            the unscaled gradients (0-d bool, 0-d float32) and of the loss sum and tokens.
        update(optimizer, grads, state, *, donate) -> (params, opt_state): after clipping.
    State layout:
        init(params, optimizer) -> opt_state for this rank.
        gather(state, optimizer, *, dst=0) -> the TrainState in the single-process layout on rank
            ``dst`` (None on the others); a collective, so every rank calls it.
        shard(full_state, optimizer) -> this rank's TrainState from a single-process one.
    """

    count: Callable
    reduce: Callable
    summarize: Callable
    update: Callable
    init: Callable
    gather: Callable
    shard: Callable
    zero_stage: int  # 0: replicated, 1: optimizer state sharded, 2: gradients sharded too
    group: Any  # the torch.distributed process group (None: the default one)


def _all_reduce_count(group, caller: str) -> Callable:
    def count(tokens: torch.Tensor) -> torch.Tensor:
        if world(group)[1] == 1:
            return tokens
        out = tokens.detach().to(torch.float64).clone()
        collective(caller, "the token-count all-reduce", dist.all_reduce, out, group=group)
        return out

    return count


def _buckets(numels: list[int], itemsize: int, bucket_mb: float | None) -> list[list[int]]:
    """Consecutive leaf indices grouped into buckets of at most ``bucket_mb`` (a bigger leaf alone)."""
    if bucket_mb is None:
        return [list(range(len(numels)))]
    cap, out, size = bucket_mb * 2**20, [[]], 0
    for i, n in enumerate(numels):
        if out[-1] and size + n * itemsize > cap:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n * itemsize
    return out


def all_reduce_accumulated(acc: Accumulated, *, group=None, bucket_mb: float | None = None,
                           caller: str = "all_reduce_accumulated") -> Accumulated:
    """``acc`` summed over the ranks: grads, loss sum and count in flat buckets, one all-reduce each.

    The loss sum and count ride in the last bucket, so with ``bucket_mb=None`` (or a model under the
    cap) a step makes exactly one collective here. The fold's own accumulators are dropped bucket
    by bucket, so the extra memory is one bucket, not a second copy of the gradients.

    Args:
        acc: what ``accumulate_gradients`` returned (this function consumes it).
        group: the process group (None: the default one).
        bucket_mb: largest bucket in MiB; None for a single bucket.

    Returns:
        Accumulated with the summed values; grads are views into the reduced buckets.
    """
    rank, size = world(group)
    if size == 1:
        return acc
    leaves, spec = optree.tree_flatten(acc.grads)
    if not leaves or len({g.dtype for g in leaves}) != 1:
        raise TypeError(f"{caller}: the gradients must be a non-empty tree of one dtype, got "
                        f"{sorted({str(g.dtype) for g in leaves})}; keep all params in one dtype.")
    dtype = leaves[0].dtype
    extra = torch.stack([acc.loss_sum.to(dtype), acc.count.to(dtype)])
    loss_dtype, count_dtype = acc.loss_sum.dtype, acc.count.dtype
    del acc  # the caller's tree goes; the leaves list is then the only owner of the old buffers
    plan = _buckets([g.numel() for g in leaves], leaves[0].element_size(), bucket_mb)
    for b, idx in enumerate(plan):
        parts = [leaves[i].reshape(-1) for i in idx] + ([extra] if b == len(plan) - 1 else [])
        flat = torch.cat(parts)
        del parts
        collective(caller, f"the gradient all-reduce (bucket {b + 1} of {len(plan)})", dist.all_reduce, flat, group=group)
        views = flat.split([leaves[i].numel() for i in idx] + ([2] if b == len(plan) - 1 else []))
        for i, v in zip(idx, views):
            leaves[i] = v.view(leaves[i].shape)  # drops this bucket's unreduced leaves
        if b == len(plan) - 1:
            extra = views[-1]
    return Accumulated(optree.tree_unflatten(spec, leaves), extra[0].to(loss_dtype), extra[1].to(count_dtype))


# TRANSITIONAL: _train.summarize_gradients and _train.update_params once the patch is in.
def _summarize_replicated(grads, loss_sum, count):
    return tree_all_finite(grads), tree_global_norm(grads), loss_sum, count


def _update_replicated(optimizer, grads, state, *, donate=False):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, donate=donate)
    return apply_updates(state.params, updates, donate=donate), opt_state


def replicated(*, group=None, bucket_mb: float | None = 64.0) -> Parallelism:
    """Plain data parallelism (ZeRO stage 0): params and optimizer state on every rank.

    Args:
        group: the process group (None: the default one; without any, a single process).
        bucket_mb: gradient bucket cap in MiB (None: one bucket, i.e. one all-reduce per step).

    Returns:
        A Parallelism for :func:`make_data_parallel_step` and the state functions.

    Example:
        >>> step = make_data_parallel_step(cfg, adamw(3e-4), replicated())  # doctest: +SKIP
    """
    caller = "replicated"

    def reduce(acc):
        return all_reduce_accumulated(acc, group=group, bucket_mb=bucket_mb, caller=caller)

    def init(params, optimizer):
        return optimizer.init(params)

    def gather(state, optimizer, *, dst=0):
        return state if world(group)[0] == dst else None

    def shard(full_state, optimizer):
        return full_state

    return Parallelism(_all_reduce_count(group, caller), reduce, _summarize_replicated, _update_replicated,
                       init, gather, shard, 0, group)


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
        collective("broadcast_tree", "the broadcast", dist.broadcast, flat, src=_global(src, group), group=group)
        for i, v in zip(idx, flat.split([leaves[i].numel() for i in idx])):
            out[i] = v.view(leaves[i].shape)
    return optree.tree_unflatten(spec, out)


def _global(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


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
    mine = replica_checksum(tree)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    every = torch.empty(size * 2, dtype=torch.int64, device=mine.device)
    collective("assert_replicas_equal", "the checksum all-gather", _all_gather_tensor, every, mine, group=group)
    every = every.view(size, 2).cpu()
    bad = [r for r in range(size) if not torch.equal(every[r], every[0])]
    if bad:
        raise RuntimeError(
            f"assert_replicas_equal: the {what} of ranks {bad} differ from rank 0's (checksums {every.tolist()}); "
            "the ranks started from different values or a step was not the same everywhere."
        )


def init_data_parallel_state(params: PyTree, optimizer, parallel: Parallelism | None = None, *, loss_scale=None,
                             policy=None, broadcast: bool = True):
    """A fresh TrainState for this rank: ``init_train_state`` with the optimizer state laid out by ``parallel``.

    Args:
        params: the model's params (every rank passes the same structure).
        optimizer: the GradientTransformation the step will use.
        parallel: the layout (default :func:`replicated`); under ZeRO this rank's optimizer state is
            ~1/N of the single-process one.
        loss_scale, policy: as for ``init_train_state``.
        broadcast: copy rank 0's params to every rank first (one collective), so ranks that seeded
            differently still start identical.

    Returns:
        TrainState(step, params, opt_state for this rank, loss_scale).
    """
    parallel = parallel or replicated()
    if broadcast:
        params = broadcast_tree(params, group=parallel.group)
    # init_train_state casts to the policy and asks this optimizer for the state: this rank's part
    # only, so the single-process optimizer state is never allocated.
    laid_out = GradientTransformation(lambda p: parallel.init(p, optimizer), optimizer.update)
    return init_train_state(params, laid_out, loss_scale=loss_scale, policy=policy)


def make_data_parallel_step(cfg, optimizer, parallel: Parallelism | None = None, *, check_replicas: bool = False,
                            **step_kwargs) -> Callable:
    """``make_train_step`` on every rank of a process group: the same ``step(state, batch)``.

    Each rank passes its own rows of the global batch (see :func:`shard_batch`); the step
    all-reduces the token count, folds the rank's micro-batches, then reduces the gradients as
    ``parallel`` says. The result equals the single-process step on the global batch up to the
    order of the floating-point sums (bit-identical for two ranks with one micro-batch each).

    Args:
        cfg, optimizer: as for ``make_train_step``.
        parallel: :func:`replicated` (default) or ``data_parallel(zero_stage=1 or 2)``.
        check_replicas: after every step, check that all ranks hold bit-identical params (one
            small all-gather; a debugging aid).
        **step_kwargs: every keyword of ``make_train_step`` (policy, accum_steps, max_grad_norm,
            loss_fn, count_fn, remat, donate, engine, policy_mode). ``accum_steps`` counts this
            rank's micro-batches. Clip with ``max_grad_norm`` (a global norm over all ranks), not
            with ``clip_by_global_norm`` inside the optimizer, which would see one shard under ZeRO.

    Returns:
        ``step(state, batch) -> (state, metrics)``; metrics are global (loss per global token,
        norm of the global gradient, tokens of all ranks) and equal on every rank.
    """
    parallel = parallel or replicated()
    step = _make_step(cfg, optimizer, parallel, **step_kwargs)
    if not check_replicas:
        return step

    def checked(state, batch):
        state, metrics = step(state, batch)
        assert_replicas_equal(state.params, group=parallel.group)
        return state, metrics

    return checked


# TRANSITIONAL: make_train_step with the Parallelism hooks. Once ``make_train_step`` takes
# ``parallel=`` (the proposed patch to _train.py), this function becomes
# ``make_train_step(cfg, optimizer, parallel=parallel, **kwargs)`` and the copy below goes.
def _make_step(cfg, optimizer, parallel: Parallelism, *, policy="fp32", accum_steps: int = 1, remat=None,
               max_grad_norm: float | None = None, loss_fn=None, count_fn=None, donate: bool = False,
               engine: str = "autograd", policy_mode: str = "cast") -> Callable:
    pol = get_policy(policy)
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"make_train_step: accum_steps must be an int >= 1, got {accum_steps!r}.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"make_train_step: max_grad_norm must be > 0 or None, got {max_grad_norm!r}.")
    if loss_fn is None:
        if cfg is None:
            raise ValueError("make_train_step: pass a ModelConfig or a loss_fn.")
        loss_fn = make_loss_fn(cfg, remat=remat)
    policed = with_policy(loss_fn, pol, mode=policy_mode)
    count_tokens = count_fn or batch_token_count

    def scaled_loss(params, batch, factor):
        loss_sum, count = policed(params, batch)
        return loss_sum * factor.to(loss_sum.dtype), (loss_sum.detach(), count.detach())

    grad_fn = value_and_grad(scaled_loss, has_aux=True, engine=engine)

    def step(state, batch):
        ls = state.loss_scale
        scale = None if isinstance(ls, NoOpLossScale) else ls.loss_scale
        local = torch.as_tensor(count_tokens(batch), dtype=torch.float64)
        total = parallel.count(local).clamp(min=1.0)
        factor = (1.0 / total) if scale is None else scale.to(torch.float64) / total
        micro = split_microbatches(batch, accum_steps) if accum_steps > 1 else [batch]
        acc = parallel.reduce(accumulate_gradients(lambda p, mb: grad_fn(p, mb, factor), state.params, micro))
        leaves, spec = optree.tree_flatten(acc.grads)
        if scale is not None and leaves:
            inv = scale.double().reciprocal()
            torch._foreach_mul_(leaves, [inv.to(g.dtype) for g in leaves])
        grads = optree.tree_unflatten(spec, leaves)
        finite, grad_norm, loss_sum, count = parallel.summarize(grads, acc.loss_sum, acc.count)
        metrics = {
            "loss": loss_sum / count.clamp(min=1.0),
            "grad_norm": grad_norm,
            "loss_scale": ls.loss_scale.detach().clone(),
            "skipped": ~finite,
            "tokens": count,
        }
        if not bool(finite):
            return state._replace(loss_scale=ls.adjust(finite)), metrics
        if max_grad_norm is not None:
            coef = torch.clamp(max_grad_norm / (grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_(leaves, [coef.to(g.dtype) for g in leaves])
        grads = pol.cast_to_param(grads)
        params, opt_state = parallel.update(optimizer, grads, state, donate=donate)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=ls.adjust(finite))
        return new, metrics

    return step
