"""Optimizers as gradient transformations: pure ``init`` / ``update`` pairs, in the optax style.

``update`` maps gradients to *updates* that :func:`apply_updates` adds to the params, so optimizers
return the negative step. Hyper-parameters live in the factory's closure; the state holds tensors
only. The arithmetic runs as multi-tensor ``torch._foreach_*`` ops over the flat leaf lists, and
for AdamW as torch's fused kernel where it can (see ``adamw_kernel.py``).

Inputs are never written to, unless the caller passes ``donate=True``: then the state, the updates
and (in :func:`apply_updates`) the params are updated in place and the same tensor objects come
back. The donated trees must not be used again, except through the returned values. Both modes run
the same arithmetic in the same order, so their results are bit-identical.

Optimizer state has the dtype of the params it was initialised from (this library hands the
optimizer fp32 master params). The step count, bias corrections and scheduled learning rates are
0-d tensors on the params' device (float64 for the scalars, as torch computes them in Python
floats), so no step reads a device value back to the host.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import optree
import torch

__all__ = ["GradientTransformation", "EmptyState", "chain", "apply_updates", "update_and_apply"]

PyTree = Any
LearningRate = Union[float, Callable[[Any], Any]]
_NONNEG = lambda v: math.isfinite(v) and v >= 0  # noqa: E731
_POS = lambda v: math.isfinite(v) and v > 0  # noqa: E731


class GradientTransformation(NamedTuple):
    """A pair of pure functions, ``init(params) -> state`` and ``update``, and an optional ``apply``.

    ``update(updates, state, params=None, *, donate=False) -> (updates, new_state)``.

    ``apply(grads, state, params, *, donate=False) -> (new_params, new_state)``, or None: the
    update and :func:`apply_updates` in one pass, for an optimizer whose kernel steps the params
    itself (AdamW's fused kernel). It must equal ``apply_updates(params, update(...))`` up to the
    rounding of the update's own subtraction; :func:`update_and_apply` falls back to that pair
    when it is None.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple]
    apply: Callable[..., tuple] | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transformation (no fields)."""


def _check(fn: str, name: str, value, ok: Callable[[float], bool], want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{fn}: {name} must be {want}, got {value!r}; pass a value in that range.")


def _check_lr(fn: str, learning_rate) -> None:
    if callable(learning_rate):
        return
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        raise TypeError(f"{fn}: learning_rate must be a number or a schedule (count -> lr), got "
                        f"{type(learning_rate).__name__}; pass e.g. learning_rate=3e-4.")
    _check(fn, "learning_rate", learning_rate, _NONNEG, "a finite number >= 0")


def _lr_at(learning_rate: LearningRate, count: torch.Tensor):
    """The learning rate for the update at ``count``: a Python float or a 0-d float64 tensor."""
    if not callable(learning_rate):
        return float(learning_rate)
    lr = learning_rate(count)
    return lr.to(device=count.device, dtype=torch.float64) if isinstance(lr, torch.Tensor) else float(lr)


def _device_of(leaves: list) -> torch.device:
    return leaves[0].device if leaves else torch.device("cpu")


def _zero_count(params: PyTree) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=_device_of(optree.tree_leaves(params)))


def _flatten_like(fn: str, tree: PyTree, spec, what: str) -> list:
    leaves, other = optree.tree_flatten(tree)
    if other != spec:
        raise ValueError(f"{fn}: {what} must have the structure of the updates, got\n  {other}\nexpected\n  {spec}.")
    return leaves


def _scalar_op(name: str, xs: list, s, *, inplace: bool) -> list:
    """``torch._foreach_<name>(xs, s)``, in place or not; ``s`` a Python number or a 0-d tensor.

    A tensor ``s`` is cast to each leaf's dtype first. That cast is what an in-place op does to a
    0-d operand anyway; doing it explicitly keeps the out-of-place op from promoting a 0-d leaf to
    float64, so both modes give the same dtypes and bits.
    """
    if not xs:
        return xs
    op = getattr(torch, f"_foreach_{name}_" if inplace else f"_foreach_{name}")
    if not isinstance(s, torch.Tensor):
        res = op(xs, s)
        return xs if inplace else list(res)
    out = list(xs)
    for dtype, idx in _groups(xs).items():
        res = op([xs[i] for i in idx], s.to(dtype))
        if not inplace:
            for i, r in zip(idx, res):
                out[i] = r
    return out


def _groups(xs: list) -> dict:
    """``{dtype: indices of the leaves of that dtype}`` (one entry in the usual all-fp32 tree)."""
    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1:
        return {dtypes.pop(): range(len(xs))}
    return {d: [i for i, x in enumerate(xs) if x.dtype == d] for d in dtypes}


def _add(xs: list, ys: list, alpha: float, *, inplace: bool) -> list:
    """``x + alpha * y`` leaf by leaf, in place into ``xs`` or into new tensors."""
    if inplace:
        torch._foreach_add_(xs, ys, alpha=alpha)
        return xs
    return list(torch._foreach_add(xs, ys, alpha=alpha))


def _next_count(count: torch.Tensor, donate: bool) -> torch.Tensor:
    return count.add_(1) if donate else count + 1


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is the tuple of their states.

    Args:
        *transforms: gradient transformations, applied left to right.

    Returns:
        A GradientTransformation whose state is a tuple with one entry per transform.

    Example:
        >>> from functional_memopt import adamw, clip_by_global_norm
        >>> opt = chain(clip_by_global_norm(1.0), adamw(3e-4))
    """

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def check(state):
        if len(state) != len(transforms):
            raise ValueError(
                f"chain: state has {len(state)} entries for {len(transforms)} transforms; "
                "pass the state made by this chain's init(params)."
            )

    def run(ts, updates, state, params, donate):
        new_state = []
        for t, s in zip(ts, state):
            updates, s = t.update(updates, s, params, donate=donate)
            new_state.append(s)
        return updates, new_state

    def update(updates, state, params=None, *, donate=False):
        check(state)
        updates, new_state = run(transforms, updates, state, params, donate)
        return updates, tuple(new_state)

    last = transforms[-1].apply if transforms else None
    if last is None:
        return GradientTransformation(init, update)

    def apply(grads, state, params, *, donate=False):
        # The transforms before the last make updates; the last one steps the params.
        check(state)
        updates, new_state = run(transforms[:-1], grads, state[:-1], params, donate)
        params, s = last(updates, state[-1], params, donate=donate)
        return params, (*new_state, s)

    return GradientTransformation(init, update, apply)


def apply_updates(params: PyTree, updates: PyTree, *, donate: bool = False) -> PyTree:
    """``params + updates`` leaf by leaf, in the params' dtypes.

    Args:
        params: the parameter tree.
        updates: a tree like ``params`` (from a transformation's ``update``).
        donate: add in place into ``params`` and return the same tensors; ``params`` must not be
            used again except through the result.

    Returns:
        The new params.

    Example:
        >>> apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), -0.5)})
        {'w': tensor([0.5000, 0.5000])}
    """
    p, spec = optree.tree_flatten(params)
    u = _flatten_like("apply_updates", updates, spec, "updates")
    if donate:
        torch._foreach_add_(p, u)
        return params
    # An out-of-place sum computes in the promoted dtype; rounding it back equals the in-place add.
    out = [r if r.dtype == x.dtype else r.to(x.dtype) for r, x in zip(torch._foreach_add(p, u), p)]
    return optree.tree_unflatten(spec, out)


def update_and_apply(optimizer: GradientTransformation, grads: PyTree, state: Any, params: PyTree, *,
                     donate: bool = False) -> tuple:
    """``(new_params, new_state)``: the optimizer's update applied to ``params``.

    The optimizer's own ``apply`` where it has one (AdamW's fused kernel steps the params in the
    same pass, with no update tree), else ``update`` then :func:`apply_updates`.

    Args:
        optimizer: a GradientTransformation.
        grads: the gradients, a tree like ``params``.
        state: the optimizer's state.
        params: the params to step.
        donate: step params and state in place and return the same tensors; neither may be
            used again except through the result, nor the gradients (which ``update`` may
            overwrite, as with ``donate`` it does).

    Example:
        >>> from functional_memopt import adamw
        >>> opt, params = adamw(0.1), {"w": torch.ones(2)}
        >>> params, state = update_and_apply(opt, {"w": torch.ones(2)}, opt.init(params), params)
        >>> params["w"]
        tensor([0.8990, 0.8990])
    """
    if optimizer.apply is not None:
        return optimizer.apply(grads, state, params, donate=donate)
    updates, state = optimizer.update(grads, state, params, donate=donate)
    return apply_updates(params, updates, donate=donate), state
