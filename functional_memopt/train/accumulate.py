"""Gradient accumulation as a functional fold over micro-batches.

One micro-batch's activations are alive at a time: each micro-batch's gradients are computed, folded
into a float32 (or float64) accumulator, and dropped before the next one runs. The fold sums loss
sums and token counts too, so the caller normalises by the *total* token count of the effective
batch. Averaging per-micro-batch mean losses instead weights tokens unequally when micro-batches
hold different numbers of tokens (the bug transformers fixed in October 2024).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import optree
import torch

__all__ = ["Accumulated", "accumulate_gradients", "accumulate_in_place", "accumulator_dtype"]


class Accumulated(NamedTuple):
    """What the fold returns."""

    grads: Any  # pytree like params, float32 (float64 for float64 grads): the sum of micro-batch grads
    loss_sum: torch.Tensor  # () float32 (float64 for a float64 loss): sum of unscaled per-token losses over all micro-batches
    count: torch.Tensor  # () float32 (or float64): tokens counted over all micro-batches


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision gradients, the gradient's own dtype for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def accumulate_gradients(
    grad_fn: Callable[[Any, Any], tuple[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], Any]],
    params: Any,
    microbatches: Iterable[Any],
) -> Accumulated:
    """Fold ``grad_fn`` over micro-batches, summing gradients in a wide accumulator.

    Args:
        grad_fn: ``grad_fn(params, microbatch) -> ((value, (loss_sum, count)), grads)``, where value
            is what was differentiated (e.g. the loss sum times the loss scale).
        params: the parameters, passed unchanged to every call.
        microbatches: an iterable of micro-batches (a generator keeps only one alive).

    Returns:
        Accumulated(grads, loss_sum, count): gradient *sums*; divide by ``count`` to normalise.

    Example:
        >>> def grad_fn(p, x):
        ...     return ((p * x).sum(), ((p * x).sum(), torch.tensor(1.0))), x
        >>> accumulate_gradients(grad_fn, torch.ones(2), [torch.ones(2), torch.ones(2)]).grads
        tensor([2., 2.])
    """
    acc_leaves = None
    spec = None
    loss_sum = None
    count = None
    for mb in microbatches:
        (_, (mb_loss, mb_count)), grads = grad_fn(params, mb)
        leaves, spec_i = optree.tree_flatten(grads)
        wide = [g.to(accumulator_dtype(g.dtype)) for g in leaves]
        if acc_leaves is None:
            # The first micro-batch's gradients become the accumulator (no zeros allocated);
            # they are fresh tensors owned by this fold, so adding into them in place is safe, once
            # each leaf has its own: an engine may hand one tensor to two leaves (the gradient of
            # ``a + b`` reaches both as the same tensor), which would then be added into twice.
            seen: set[int] = set()
            wide = [g.clone() if id(g) in seen or seen.add(id(g)) else g for g in wide]
            acc_leaves, spec = wide, spec_i
            loss_sum = mb_loss.to(accumulator_dtype(mb_loss.dtype))
            count = mb_count.to(accumulator_dtype(mb_count.dtype))
        else:
            if spec_i != spec:
                raise ValueError("accumulate_gradients: micro-batch gradients changed tree structure.")
            torch._foreach_add_(acc_leaves, wide)
            loss_sum = loss_sum + mb_loss
            count = count + mb_count
        del grads, leaves, wide  # let this micro-batch's gradients go before the next forward
    if acc_leaves is None:
        raise ValueError("accumulate_gradients: got no micro-batches; pass at least one.")
    return Accumulated(optree.tree_unflatten(spec, acc_leaves), loss_sum, count)


def accumulate_in_place(fn: Callable[[Any, Any], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]],
                        params: Any, microbatches: Iterable[Any]) -> Accumulated:
    """The fold of the autograd engine: autograd adds each micro-batch's gradients into one buffer per leaf.

    ``fn(params, microbatch) -> (value, (loss_sum, count))`` is differentiated with
    ``torch.autograd.backward`` on detached aliases of the leaves (the caller's tensors are never
    touched), so each leaf's gradient is added into its buffer (autograd's AccumulateGrad) as soon
    as the backward has made it: a micro-batch's gradient tree never exists beside the sum. The
    first micro-batch's gradients become the buffers, later ones are added in place, in the same
    order and dtype as :func:`accumulate_gradients`, so the sums are bit-identical. Needs float32
    or float64 floating leaves (half-precision leaves want a float32 sum: use the general fold).

    Returns:
        Accumulated(grads, loss_sum, count): gradient *sums*; leaves no micro-batch reached are zeros.
    """
    leaves, spec = optree.tree_flatten(params)
    live = [x.detach().requires_grad_(x.is_floating_point()) for x in leaves]
    bad = sorted({str(x.dtype) for x in live if x.requires_grad and accumulator_dtype(x.dtype) != x.dtype})
    if bad:
        raise ValueError(f"accumulate_in_place: leaves of dtype {bad} need a wider sum; use accumulate_gradients.")
    tree = optree.tree_unflatten(spec, live)
    wrt = [x for x in live if x.requires_grad]
    loss_sum = count = None
    for mb in microbatches:
        with torch.enable_grad():
            value, (mb_loss, mb_count) = fn(tree, mb)
            torch.autograd.backward(value, inputs=wrt)
        del value
        if loss_sum is None:
            loss_sum = mb_loss.detach().to(accumulator_dtype(mb_loss.dtype))
            count = mb_count.detach().to(accumulator_dtype(mb_count.dtype))
        else:
            loss_sum = loss_sum + mb_loss.detach()
            count = count + mb_count.detach()
    if loss_sum is None:
        raise ValueError("accumulate_in_place: got no micro-batches; pass at least one.")
    grads = [x.grad if x.requires_grad and x.grad is not None else torch.zeros_like(x) for x in live]
    for x in wrt:
        x.grad = None  # the sums now belong to the returned tree alone
    return Accumulated(optree.tree_unflatten(spec, grads), loss_sum, count)
