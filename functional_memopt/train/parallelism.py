"""How a training step spreads over ranks: the hooks the step calls, and the one-process default.

The step (``step.py``) is written once; a :class:`Parallelism` tells it how to count tokens over
all ranks, reduce the fold's sums, summarize the reduced gradients and apply the update, and how
its state is laid out. :func:`single_process` is the plain layout: every hook is the identity or
the one-process computation. ``functional_memopt.parallel`` builds the data-parallel and ZeRO
ones on ``torch.distributed``; this layer knows nothing of collectives.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from .._tree import tree_global_norm
from ..optim.base import GradientTransformation, update_and_apply

__all__ = ["Parallelism", "single_process", "summarize_gradients", "update_params"]


class Parallelism(NamedTuple):
    """How a training step spreads over ranks: step hooks and state layout, as pure functions.

    Step hooks, called by the step in this order:
        count(tokens) -> tokens: the global token count from this rank's (0-d float64).
        reduce(acc) -> acc: the fold's Accumulated summed over ranks (grads may become a shard).
        summarize(grads, loss_sum, count) -> (finite, grad_norm, loss_sum, count): global values of
            the unscaled gradients (0-d bool, 0-d float32) and of the loss sum and tokens.
        update(optimizer, grads, state, *, donate) -> (params, opt_state): after clipping.
    State layout:
        init(params, optimizer) -> (params, opt_state): this rank's start (params made identical
            on every rank, the optimizer state of this rank's shard).
        gather(state, optimizer, *, dst=0) -> the TrainState in the single-process layout on rank
            ``dst`` (None on the others); a collective, so every rank calls it.
        shard(full_state, optimizer) -> this rank's TrainState from a single-process one.
        on_main(fn, *, what) -> fn() run on rank 0 only, every rank learning whether it failed.
    """

    count: Callable
    reduce: Callable
    summarize: Callable
    update: Callable
    init: Callable
    gather: Callable
    shard: Callable
    on_main: Callable
    zero_stage: int  # 0: replicated, 1: optimizer state sharded, 2: gradients sharded too
    world_size: int  # ranks the step spreads over
    group: Any  # the torch.distributed process group (None: the default one, or none at all)


def summarize_gradients(grads, loss_sum: torch.Tensor, count: torch.Tensor) -> tuple:
    """``(finite, global_norm(grads), loss_sum, count)``: the single-process summary.

    The norm is finite exactly when every gradient element is finite (inf and nan propagate
    through the sum of squares), so one pass over the gradients gives both; a norm that overflows
    float32 (above ~3e38) also counts as non-finite, and that step is skipped too.
    """
    norm = tree_global_norm(grads)
    return torch.isfinite(norm), norm, loss_sum, count


def update_params(optimizer: GradientTransformation, grads, state, *, donate: bool = False) -> tuple:
    """``(params, opt_state)`` after one optimizer update: the single-process update.

    The optimizer steps the params in its own kernel pass where it can (``update_and_apply``).
    """
    return update_and_apply(optimizer, grads, state.opt_state, state.params, donate=donate)


def _same(value, *args, **kwargs):
    return value


def single_process() -> Parallelism:
    """The one-process Parallelism: no collectives, the state in its plain layout.

    Example:
        >>> single_process().world_size
        1
    """
    return Parallelism(
        count=_same,
        reduce=_same,
        summarize=summarize_gradients,
        update=update_params,
        init=lambda params, optimizer: (params, optimizer.init(params)),
        gather=lambda state, optimizer, *, dst=0: state,
        shard=lambda full_state, optimizer: full_state,
        on_main=lambda fn, *, what: fn(),
        zero_stage=0,
        world_size=1,
        group=None,
    )
