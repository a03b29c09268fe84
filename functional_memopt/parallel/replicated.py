"""Data parallel training on torch.distributed (ZeRO stage 0): batch shards and one gradient all-reduce.

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

The step's hooks are a ``train.parallelism.Parallelism``; :func:`replicated` builds the stage-0
one, and ``zero.data_parallel`` (the public way in) adds optimizer-state (stage 1) and gradient
(stage 2) sharding. Without a process group everything here runs as a single process.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch
import torch.distributed as dist

from ..train.accumulate import Accumulated
from ..train.parallelism import Parallelism, summarize_gradients, update_params
from .process_group import assert_replicas_equal, broadcast_tree, collective, on_rank_0, world

__all__ = ["shard_batch", "all_reduce_count", "all_reduce_accumulated", "replicated"]

PyTree = Any


def shard_batch(batch, rank: int, world_size: int):
    """This rank's rows of a global batch: the ``rank``-th of ``world_size`` near-equal row slices.

    Every rank builds the same global batch (e.g. ``sample_batch`` with the same seed and index)
    and keeps its slice, so a resumed or resized run sees the same data. Slices are views.

    Args:
        batch: a NamedTuple (e.g. Batch) of (B, ...) tensors or None.
        rank, world_size: from ``init_distributed``.

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


def all_reduce_count(group, caller: str) -> Callable:
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


def replicated(*, group=None, bucket_mb: float | None = 64.0, check_replicas: bool = False) -> Parallelism:
    """Plain data parallelism (ZeRO stage 0): params and optimizer state on every rank.

    Args:
        group: the process group (None: the default one; without any, a single process).
        bucket_mb: gradient bucket cap in MiB (None: one bucket, i.e. one all-reduce per step).
        check_replicas: after every update, check that all ranks hold bit-identical params (one
            small all-gather of checksums; a debugging aid).

    Returns:
        The stage-0 Parallelism for ``make_train_step(parallel=...)`` and ``init_train_state``.
    """
    caller = "data_parallel"

    def reduce(acc):
        return all_reduce_accumulated(acc, group=group, bucket_mb=bucket_mb, caller=caller)

    def update(optimizer, grads, state, *, donate=False):
        params, opt_state = update_params(optimizer, grads, state, donate=donate)
        if check_replicas:
            assert_replicas_equal(params, group=group)
        return params, opt_state

    def init(params, optimizer):
        params = broadcast_tree(params, group=group)  # ranks that seeded differently still start identical
        return params, optimizer.init(params)

    def gather(state, optimizer, *, dst=0):
        return state if world(group)[0] == dst else None

    def shard(full_state, optimizer):
        return full_state

    def on_main(fn, *, what):
        return on_rank_0(fn, what=what, group=group, caller=caller)

    return Parallelism(count=all_reduce_count(group, caller), reduce=reduce, summarize=summarize_gradients,
                       update=update, init=init, gather=gather, shard=shard, on_main=on_main, zero_stage=0,
                       world_size=world(group)[1], group=group)
