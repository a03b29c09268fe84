"""AdamW with decoupled weight decay, with the semantics and defaults of ``torch.optim.AdamW``.

The arithmetic lives in ``adamw_kernel`` (torch's fused kernel where it can run); this module holds
the hyper-parameters, the state and the weight-decay mask.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import optree
import torch

from ..model.layout import EMBEDDINGS
from .adamw_kernel import adamw_update
from .base import (_NONNEG, _POS, GradientTransformation, LearningRate, PyTree, _check, _check_lr, _flatten_like,
                   _lr_at, _next_count, _zero_count)

__all__ = ["ScaleByAdamState", "decay_mask", "adamw"]


class ScaleByAdamState(NamedTuple):
    """State of :func:`adamw`."""

    count: torch.Tensor  # () int64: updates applied so far, on the params' device
    mu: PyTree  # like params (same shapes and dtypes): first-moment running average
    nu: PyTree  # like params (same shapes and dtypes): second-moment running average


def decay_mask(params: PyTree) -> PyTree:
    """A bool tree like ``params``: True for matrices (dim >= 2) except the embeddings wte and wpe.

    In this library's params that selects the 2-D linear weights and leaves out biases, layer
    norms, the tied token embedding ``wte`` and the position table ``wpe`` (nanoGPT's split).

    Example:
        >>> decay_mask({"wte": torch.ones(4, 2), "ln_f": {"weight": torch.ones(2)}, "h": [{"w": torch.ones(2, 2)}]})
        {'wte': False, 'ln_f': {'weight': False}, 'h': [{'w': True}]}
    """
    paths, leaves, spec = optree.tree_flatten_with_path(params)
    flags = [x.dim() >= 2 and not (path and path[-1] in EMBEDDINGS) for path, x in zip(paths, leaves)]
    return optree.tree_unflatten(spec, flags)


def adamw(learning_rate: LearningRate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, mask: PyTree | Callable | None = None) -> GradientTransformation:
    """Adam with decoupled weight decay, with the semantics and defaults of ``torch.optim.AdamW``.

    With ``t = count + 1`` and ``lr = lr(count)``: ``mu = lerp(mu, g, 1 - b1)``,
    ``nu = b2 * nu + (1 - b2) * g * g``, and the update is
    ``-(lr / (1 - b1**t)) * mu / (sqrt(nu) / sqrt(1 - b2**t) + eps) + (p * (1 - lr * wd) - p)``,
    the last term only on leaves selected by ``mask``. On CPU and CUDA (contiguous gradients and
    state) one pass of ``torch.optim.AdamW(fused=True)``'s kernel computes it, and ``p + update``
    is that kernel's step bit for bit unless a value moves by more than a factor of two; elsewhere
    (and under ``torch.compile``) multi-tensor ops in the order of torch's ``foreach`` step with
    ``capturable=True`` do, up to the rounding of one subtraction.

    Args:
        learning_rate: a number >= 0 or a schedule ``count -> lr`` (count = updates already applied).
        b1: first-moment decay, in [0, 1).
        b2: second-moment decay, in [0, 1).
        eps: added to the denominator, > 0.
        weight_decay: decoupled decay coefficient, >= 0.
        mask: which leaves decay: a bool tree like params, or a callable params -> such a tree
            (e.g. :func:`decay_mask`); None decays every leaf, as torch does.

    Returns:
        A GradientTransformation with :class:`ScaleByAdamState`. Its ``apply`` (which
        :func:`update_and_apply` and the train step use) steps the params in the same kernel
        pass: with the fused route, exactly ``torch.optim.AdamW(fused=True)``'s step.

    Example:
        >>> from functional_memopt import apply_updates
        >>> opt = adamw(3e-4, mask=decay_mask)
        >>> params = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.ones(2, 2), "b": torch.ones(2)}, state, params)
        >>> params = apply_updates(params, updates)
    """
    fn = "adamw"
    _check_lr(fn, learning_rate)
    _check(fn, "b1", b1, lambda v: 0 <= v < 1, "in [0, 1)")
    _check(fn, "b2", b2, lambda v: 0 <= v < 1, "in [0, 1)")
    _check(fn, "eps", eps, _POS, "a finite number > 0")
    _check(fn, "weight_decay", weight_decay, _NONNEG, "a finite number >= 0")

    def decayed(params, spec) -> set[int]:
        """Indices of the leaves that get weight decay."""
        if weight_decay == 0:
            return set()
        if params is None:
            raise ValueError("adamw: weight_decay > 0 needs the params; call update(updates, state, params).")
        if mask is None:
            return set(range(spec.num_leaves))
        m = mask(params) if callable(mask) else mask
        return {i for i, keep in enumerate(_flatten_like(fn, m, spec, "mask")) if keep}

    def init(params):
        zeros = lambda: optree.tree_map(torch.zeros_like, params)  # noqa: E731
        return ScaleByAdamState(_zero_count(params), zeros(), zeros())

    def run(grads, state, params, donate, apply):
        g, spec = optree.tree_flatten(grads)
        mu = _flatten_like(fn, state.mu, spec, "state.mu")
        nu = _flatten_like(fn, state.nu, spec, "state.nu")
        idx = decayed(params, spec)
        p = _flatten_like(fn, params, spec, "params") if idx or apply else None
        lr = _lr_at(learning_rate, state.count)
        count = _next_count(state.count, donate)
        out, mu, nu = adamw_update(g, mu, nu, p, idx, count, lr, b1=b1, b2=b2, eps=eps,
                                   weight_decay=weight_decay, donate=donate, apply=apply)
        unflat = lambda xs: optree.tree_unflatten(spec, xs)  # noqa: E731
        return unflat(out), ScaleByAdamState(count, unflat(mu), unflat(nu))

    def update(updates, state, params=None, *, donate=False):
        return run(updates, state, params, donate, apply=False)

    def apply(grads, state, params, *, donate=False):
        if params is None:
            raise ValueError("adamw: apply steps the params, so it needs them; call apply(grads, state, params).")
        return run(grads, state, params, donate, apply=True)

    return GradientTransformation(init, update, apply)


