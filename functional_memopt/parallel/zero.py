"""ZeRO stages 1 and 2, and :func:`data_parallel`, the one way in to data parallel training.

Stages 1 and 2 shard the optimizer state (and the gradients) over ranks as flat fp32 slices.

The params, in optree's leaf order, are laid end to end in one flat vector of P elements padded to
a multiple of the world size N; rank r owns the slice ``[r * P/N, (r + 1) * P/N)``. Within it, each
param leaf contributes a *piece* (its elements in the slice, possibly none), viewed with the leaf's
number of dimensions as ``(1, ..., 1, n)``. The optimizer is the library's own GradientTransformation
run on the tree of pieces, so it sees the param tree's structure: an elementwise optimizer (adamw,
sgd) computes exactly what it computes unsharded, and a weight-decay mask, given as a bool tree or
as a callable of path and ``ndim`` (``decay_mask``), selects the same elements.

    stage 1: all_reduce(grads) as in stage 0; update this rank's pieces; all_gather the params
    stage 2: reduce_scatter(grads) into this rank's slice; one small all_reduce of
             [sum of squares, non-finite count, loss sum, tokens]; update; all_gather the params

Each rank keeps ~1/N of the optimizer state. The global gradient norm under stage 2 is the square
root of the summed squared shard norms, so clipping sees the whole gradient, as the single-process
step does (to rounding). ``clip_by_global_norm`` inside the optimizer would see one shard: clip with
the step's ``max_grad_norm`` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import optree
import torch
import torch.distributed as dist

from ..optim.base import update_and_apply
from ..train.accumulate import Accumulated
from ..train.parallelism import Parallelism
from .process_group import (all_gather_tensor, assert_replicas_equal, broadcast_tree, collective, global_rank,
                            reduce_scatter_tensor, world)
from .replicated import all_reduce_count, replicated

__all__ = ["FlatLayout", "flat_layout", "data_parallel"]

PyTree = Any
_PROBE = 1_000_003  # probe leaf i has shape (_PROBE + i,): optimizer-state leaves of that shape belong to leaf i


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each param leaf lies in the padded flat vector, and which slice this rank owns."""

    spec: Any  # the params' treespec
    shapes: tuple  # each leaf's shape
    offsets: tuple  # each leaf's first element in the flat vector
    numel: int  # P, elements of all leaves
    world_size: int  # N
    rank: int  # this rank, owning [lo, hi)
    dtype: torch.dtype  # the params' dtype (one for all leaves)

    @property
    def shard_size(self) -> int:
        """Elements per rank: ceil(P / N)."""
        return -(-self.numel // self.world_size)

    def bounds(self, rank: int | None = None) -> tuple[int, int]:
        """``[lo, hi)`` of a rank's slice in the flat vector (this rank's by default)."""
        r = self.rank if rank is None else rank
        return r * self.shard_size, (r + 1) * self.shard_size

    @functools.cached_property
    def ranges(self) -> tuple:
        """Per leaf, ``(a, b)``: the leaf's flattened elements ``[a, b)`` fall in this rank's slice."""
        lo, hi = self.bounds()
        return tuple((min(max(lo - o, 0), _numel(s)), min(max(hi - o, 0), _numel(s))) for s, o in zip(self.shapes, self.offsets))

    def piece(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """This rank's piece of leaf ``i`` given the full leaf ``x`` (a view when ``x`` is contiguous)."""
        a, b = self.ranges[i]
        return x.reshape(-1)[a:b].view(_piece_shape(self.shapes[i], b - a))

    def pieces(self, leaves: list) -> list:
        """This rank's pieces of all the full leaves."""
        return [self.piece(i, x) for i, x in enumerate(leaves)]

    def pieces_of_shard(self, shard: torch.Tensor) -> list:
        """Views of this rank's flat slice (``shard_size`` elements) as pieces."""
        lo, _ = self.bounds()
        return [shard[off + a - lo:off + b - lo].view(_piece_shape(s, b - a))
                for s, off, (a, b) in zip(self.shapes, self.offsets, self.ranges)]

    @property
    def shard_numel(self) -> int:
        """Elements of real leaves in this rank's slice (the rest is padding)."""
        return sum(b - a for a, b in self.ranges)

    def unflatten(self, flat: torch.Tensor) -> PyTree:
        """The param tree from a full flat vector (views)."""
        return optree.tree_unflatten(self.spec, [flat[o:o + _numel(s)].view(s) for s, o in zip(self.shapes, self.offsets)])


def _numel(shape) -> int:
    return math.prod(shape)


def _piece_shape(shape: tuple, n: int) -> tuple:
    return (1,) * (len(shape) - 1) + (n,)


def flat_layout(params: PyTree, *, world_size: int, rank: int) -> FlatLayout:
    """The flat layout of ``params`` over ``world_size`` ranks, seen from ``rank``."""
    leaves, spec = optree.tree_flatten(params)
    dtypes = {x.dtype for x in leaves}
    if not leaves or len(dtypes) != 1 or not leaves[0].is_floating_point():
        raise TypeError(f"flat_layout: ZeRO needs params of one floating dtype, got {sorted(map(str, dtypes))}; "
                        "cast them with the policy's param dtype (e.g. policy='mixed_bf16' keeps float32 masters).")
    offsets, at = [], 0
    for x in leaves:
        offsets.append(at)
        at += x.numel()
    return FlatLayout(spec, tuple(tuple(x.shape) for x in leaves), tuple(offsets), at, world_size, rank, leaves[0].dtype)


def _flat_buffer(params: PyTree, layout: FlatLayout) -> torch.Tensor | None:
    """The padded flat buffer whose views are exactly the leaves of ``params``, if there is one."""
    leaves = optree.tree_leaves(params)
    storage, base = leaves[0].untyped_storage(), leaves[0].storage_offset()
    n = layout.world_size * layout.shard_size
    for x, o in zip(leaves, layout.offsets):
        if x.untyped_storage().data_ptr() != storage.data_ptr() or x.storage_offset() != base + o or not x.is_contiguous():
            return None
    if storage.nbytes() < (base + n) * leaves[0].element_size():
        return None
    return leaves[0].as_strided((n,), (1,), base)


def _layout(params, group) -> FlatLayout:
    rank, size = world(group)
    return flat_layout(params, world_size=size, rank=rank)


def _state_owners(optimizer, layout: FlatLayout) -> tuple[Any, list]:
    """The optimizer state's treespec and, per leaf, the param leaf it is like (None: replicated)."""
    probe = optree.tree_unflatten(layout.spec, [torch.empty(_PROBE + i, dtype=layout.dtype, device="meta")
                                                for i in range(len(layout.shapes))])
    leaves, spec = optree.tree_flatten(optimizer.init(probe))
    owners = []
    for x in leaves:
        i = x.shape[0] - _PROBE if isinstance(x, torch.Tensor) and x.dim() == 1 else -1
        owners.append(i if 0 <= i < len(layout.shapes) else None)
        if owners[-1] is None and isinstance(x, torch.Tensor) and x.numel() > 1:
            raise TypeError("data_parallel: ZeRO shards optimizer states whose leaves are like the params or "
                            f"scalars; this optimizer's state has a leaf of shape {tuple(x.shape)}. Use zero_stage=0.")
    return spec, owners


def _runs(owners: list) -> list[tuple[int, int]]:
    """Maximal runs ``[j, k)`` of state leaves owned by consecutive param leaves."""
    runs, j = [], 0
    while j < len(owners):
        if owners[j] is None:
            j += 1
            continue
        k = j + 1
        while k < len(owners) and owners[k] is not None and owners[k] == owners[k - 1] + 1:
            k += 1
        runs.append((j, k))
        j = k
    return runs


def _gather_opt_state(opt_state, optimizer, layout: FlatLayout, group, dst: int):
    """The single-process optimizer state on ``dst`` (None elsewhere), one gather per run of leaves."""
    spec, owners = _state_owners(optimizer, layout)
    leaves, have = optree.tree_flatten(opt_state)
    if have != spec:
        raise ValueError(f"Parallelism.gather: the optimizer state does not come from this optimizer's init:\n  {have}\nexpected\n  {spec}.")
    mine = layout.rank == dst
    out = list(leaves)
    for j, k in _runs(owners):
        first, last = owners[j], owners[k - 1]
        start, end = layout.offsets[first], layout.offsets[last] + _numel(layout.shapes[last])
        spans = [(max(start, lo), min(end, hi)) for lo, hi in map(layout.bounds, range(layout.world_size))]
        lengths = [max(0, b - a) for a, b in spans]
        width = max(lengths)
        local = torch.cat([x.reshape(-1) for x in leaves[j:k]])
        local = torch.cat([local, local.new_zeros(width - local.numel())])
        if layout.world_size == 1:
            bufs = [local]
        else:
            bufs = [torch.empty_like(local) for _ in range(layout.world_size)] if mine else None
            collective("Parallelism.gather", "the optimizer-state gather", dist.gather, local, bufs,
                       dst=global_rank(dst, group), group=group)
        if mine:
            full = torch.cat([b[:n] for b, n in zip(bufs, lengths)])
            sizes = [_numel(layout.shapes[i]) for i in owners[j:k]]
            for m, (i, piece) in enumerate(zip(owners[j:k], full.split(sizes))):
                out[j + m] = piece.view(layout.shapes[i])
    return optree.tree_unflatten(spec, out) if mine else None


def _shard_opt_state(full_state, optimizer, layout: FlatLayout):
    """This rank's optimizer state from the single-process one (copies: the full one can go)."""
    spec, owners = _state_owners(optimizer, layout)
    leaves, have = optree.tree_flatten(full_state)
    if have != spec:
        raise ValueError(f"Parallelism.shard: the optimizer state does not come from this optimizer's init:\n  {have}\nexpected\n  {spec}.")
    out = list(leaves)
    for j, i in enumerate(owners):
        if i is not None:
            if tuple(leaves[j].shape) != layout.shapes[i]:
                raise ValueError(f"Parallelism.shard: optimizer-state leaf {j} has shape {tuple(leaves[j].shape)}, "
                                 f"expected {layout.shapes[i]} like param leaf {i}.")
            out[j] = layout.piece(i, leaves[j]).clone()
    return optree.tree_unflatten(spec, out)


def _tree_pieces(layout: FlatLayout, tree: PyTree) -> PyTree:
    return optree.tree_unflatten(layout.spec, layout.pieces(optree.tree_leaves(tree)))


def data_parallel(*, zero_stage: int = 0, group=None, bucket_mb: float | None = 64.0,
                  check_replicas: bool = False) -> Parallelism:
    """Data parallelism with ZeRO stage 0 (replicated), 1 (optimizer state sharded) or 2 (gradients too).

    The one way in to data parallel: pass the result as ``parallel=`` to ``make_train_step``,
    ``init_train_state``, ``save_checkpoint`` and ``load_checkpoint``. Each rank gives the step its
    own rows of the global batch (``shard_batch``); the result equals the single-process step on
    the global batch up to the order of the floating-point sums.

    Args:
        zero_stage: 0, 1 or 2.
        group: the process group (None: the default one; without any, a single process).
        bucket_mb: stages 0 and 1: gradient all-reduce bucket cap in MiB (None: one bucket).
        check_replicas: after every update, check that all ranks hold bit-identical params (one
            small all-gather; a debugging aid).

    Returns:
        A Parallelism.

    Example:
        >>> par = data_parallel(zero_stage=2)
        >>> state = init_train_state(params, opt, parallel=par)  # doctest: +SKIP
        >>> step = make_train_step(cfg, opt, accum_steps=4, parallel=par)  # doctest: +SKIP
    """
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2):
        raise ValueError(f"data_parallel: zero_stage must be 0, 1 or 2, got {zero_stage!r}.")
    if zero_stage == 0:
        return replicated(group=group, bucket_mb=bucket_mb, check_replicas=check_replicas)
    caller = f"data_parallel(zero_stage={zero_stage})"
    plain = replicated(group=group, bucket_mb=bucket_mb)

    def reduce_scatter(acc: Accumulated) -> Accumulated:
        leaves, spec = optree.tree_flatten(acc.grads)
        loss_sum, count = acc.loss_sum, acc.count
        del acc  # leaves is now the only owner of the fold's buffers
        layout = _layout(optree.tree_unflatten(spec, leaves), group)
        flat = leaves[0].new_zeros(layout.world_size * layout.shard_size)
        for i, o in enumerate(layout.offsets):  # copy leaf by leaf, dropping each: one copy alive, not two
            flat[o:o + leaves[i].numel()] = leaves[i].reshape(-1)
            leaves[i] = None
        if layout.world_size > 1:
            shard = flat.new_empty(layout.shard_size)
            collective(caller, "the gradient reduce-scatter", reduce_scatter_tensor, shard, flat, group=group)
            flat = shard
        return Accumulated(optree.tree_unflatten(spec, layout.pieces_of_shard(flat)), loss_sum, count)

    def summarize_shards(grads, loss_sum, count):
        pieces = [x for x in optree.tree_leaves(grads) if x.numel()]
        sq = torch.stack(torch._foreach_norm(pieces)).double().square().sum() if pieces else loss_sum.new_zeros((), dtype=torch.float64)
        bad = torch.stack([~torch.isfinite(x).all() for x in pieces]).sum().double() if pieces else sq * 0
        v = torch.stack([sq, bad, loss_sum.double(), count.double()])
        if world(group)[1] > 1:
            collective(caller, "the gradient-norm all-reduce", dist.all_reduce, v, group=group)
        return v[1] == 0, v[0].sqrt().float(), v[2].to(loss_sum.dtype), v[3].to(count.dtype)

    def update(optimizer, grads, state, *, donate=False):
        layout = _layout(state.params, group)
        g = grads if zero_stage == 2 else _tree_pieces(layout, grads)
        p = _tree_pieces(layout, state.params)
        new, opt_state = update_and_apply(optimizer, g, state.opt_state, p, donate=donate)
        new = optree.tree_leaves(new)
        # Donated params that are views of one flat buffer (as every step returns them) receive
        # the gather in place; the pieces updated above already are that buffer's own slice.
        full = _flat_buffer(state.params, layout) if donate else None
        if layout.world_size == 1 and full is not None:
            return state.params, opt_state
        mine = torch.cat([x.reshape(-1) for x in new] + [new[0].new_zeros(layout.shard_size - layout.shard_numel)])
        if layout.world_size == 1:
            return layout.unflatten(mine), opt_state
        full = mine.new_empty(layout.world_size * layout.shard_size) if full is None else full
        collective(caller, "the params all-gather", all_gather_tensor, full, mine, group=group)
        params = layout.unflatten(full)
        if check_replicas:
            assert_replicas_equal(params, group=group)
        return params, opt_state

    def init(params, optimizer):
        params = broadcast_tree(params, group=group)  # ranks that seeded differently still start identical
        return params, optimizer.init(_tree_pieces(_layout(params, group), params))

    def gather(state, optimizer, *, dst=0):
        layout = _layout(state.params, group)
        full = _gather_opt_state(state.opt_state, optimizer, layout, group, dst)
        return state._replace(opt_state=full) if layout.rank == dst else None

    def shard(full_state, optimizer):
        layout = _layout(full_state.params, group)
        return full_state._replace(opt_state=_shard_opt_state(full_state.opt_state, optimizer, layout))

    hooks = dict(update=update, init=init, gather=gather, shard=shard, on_main=plain.on_main,
                 zero_stage=zero_stage, world_size=plain.world_size, group=group)
    if zero_stage == 1:
        return Parallelism(count=plain.count, reduce=plain.reduce, summarize=plain.summarize, **hooks)
    return Parallelism(count=all_reduce_count(group, caller), reduce=reduce_scatter, summarize=summarize_shards,
                       **hooks)
