"""Data parallel training on torch.distributed: batch shards, one gradient all-reduce, checkpoints.

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
hooks that ``make_train_step(parallel=...)`` calls (``count``, ``reduce``, ``summarize``,
``update``) and how its state is laid out (``init``, ``gather``, ``shard``). :func:`replicated` is
plain data parallelism (ZeRO stage 0); ``functional_memopt._zero.data_parallel`` adds
optimizer-state (stage 1) and gradient (stage 2) sharding. Checkpoints are written and read in the
single-process layout, so a run resumes on any number of ranks, any stage, or in one process.

The process group comes from ``functional_memopt._process_group.init_distributed``; without one
everything here runs as a single process.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.distributed as dist

from ._accumulate import Accumulated
from ._checkpoint import STATE_JSON, load_checkpoint, save_checkpoint
from ._optim import GradientTransformation
from ._process_group import assert_replicas_equal, broadcast_tree, collective, global_rank, on_rank_0, world
from ._train import init_train_state, make_train_step, summarize_gradients, update_params

__all__ = [
    "shard_batch", "Parallelism", "replicated", "all_reduce_accumulated", "init_data_parallel_state",
    "make_data_parallel_step", "save_distributed_checkpoint", "load_distributed_checkpoint",
]

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

    return Parallelism(all_reduce_count(group, caller), reduce, summarize_gradients, update_params,
                       init, gather, shard, 0, group)


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
    step = make_train_step(cfg, optimizer, parallel=parallel, **step_kwargs)
    if not check_replicas:
        return step

    def checked(state, batch):
        state, metrics = step(state, batch)
        assert_replicas_equal(state.params, group=parallel.group)
        return state, metrics

    return checked


def save_distributed_checkpoint(run_dir, state, optimizer, parallel: Parallelism, *, cfg, meta: dict | None = None) -> str:
    """Save a data-parallel run's state in the single-process layout; every rank calls it.

    The full TrainState (params, the whole optimizer state in the unsharded tree layout, loss
    scale, step) is gathered on rank 0, which writes it with ``save_checkpoint``; the other ranks
    wait for the outcome, so a failed write raises on every rank (``RankFailed`` off rank 0). ``load_checkpoint`` with an
    ``init_train_state`` template reads the files in a single process, and
    :func:`load_distributed_checkpoint` reads them into any world size and ZeRO stage.

    Args:
        run_dir: an existing folder on rank 0's machine.
        state: this rank's TrainState.
        optimizer: the optimizer of the run (its init gives the state's layout).
        parallel: the run's Parallelism.
        cfg, meta: as for ``save_checkpoint`` (meta: e.g. the next batch index).

    Returns:
        The path of the checkpoint's ``state.json``.
    """
    full = parallel.gather(state, optimizer, dst=0)
    on_rank_0(lambda: save_checkpoint(run_dir, full, cfg=cfg, meta=meta), what="writing the checkpoint",
              group=parallel.group, caller="save_distributed_checkpoint")
    return os.path.join(os.fspath(run_dir), STATE_JSON)


def _full_like(like, optimizer):
    """``like`` with the single-process optimizer state as zero-stride tensors: shapes, no memory."""
    leaves = optree.tree_leaves(like.params)
    device = leaves[0].device
    meta = optree.tree_map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"), like.params)
    opt = optree.tree_map(lambda x: torch.zeros((), dtype=x.dtype, device=device).expand(x.shape), optimizer.init(meta))
    return like._replace(opt_state=opt)


def load_distributed_checkpoint(run_dir, like, optimizer, parallel: Parallelism, *, cfg=None, restore_rng: bool = False,
                                broadcast: bool = False):
    """Read a checkpoint (from any world size, or from one process) into this rank's layout.

    Every rank calls it. Each reads the single-process state and keeps its own shard, so resuming
    on another number of ranks, or another ZeRO stage, needs nothing special.

    Args:
        run_dir: the checkpoint's folder.
        like: a TrainState of this rank (e.g. from ``init_data_parallel_state``): its structure,
            dtypes and devices; no values are used.
        optimizer, parallel: those of the resumed run.
        cfg, restore_rng: as for ``load_checkpoint``.
        broadcast: rank 0 reads the files and sends them to the others (for machines that do not
            share the run folder); by default every rank reads them.

    Returns:
        (state, meta): this rank's TrainState and the meta saved with it.
    """
    rank, size = world(parallel.group)
    # A replicated state is the full state already; sharded ones need the full shapes.
    template = like if parallel.zero_stage == 0 else _full_like(like, optimizer)
    if broadcast and size > 1:
        holder = [None]
        if rank == 0:
            full, holder[0] = load_checkpoint(run_dir, template, cfg=cfg, restore_rng=restore_rng)
        else:
            full = template
        collective("load_distributed_checkpoint", "the meta broadcast", dist.broadcast_object_list, holder,
                   src=global_rank(0, parallel.group), group=parallel.group)
        full, meta = broadcast_tree(full, group=parallel.group), holder[0]
    else:
        full, meta = load_checkpoint(run_dir, template, cfg=cfg, restore_rng=restore_rng)
    return parallel.shard(full, optimizer), meta
