"""Stochastic gradient descent, with the semantics of ``torch.optim.SGD``."""

from __future__ import annotations

from typing import NamedTuple

import optree
import torch

from .base import (_NONNEG, GradientTransformation, LearningRate, PyTree, _add, _check, _check_lr, _flatten_like,
                   _lr_at, _next_count, _scalar_op, _zero_count)

__all__ = ["SgdState", "sgd"]


class SgdState(NamedTuple):
    """State of :func:`sgd`."""

    count: torch.Tensor  # () int64: updates applied so far, on the params' device
    momentum: PyTree  # like params, or None when momentum == 0: the momentum buffer


def sgd(learning_rate: LearningRate, *, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> GradientTransformation:
    """Stochastic gradient descent with the semantics of ``torch.optim.SGD`` (dampening 0).

    ``g += weight_decay * p`` (coupled L2); with momentum, ``buf = momentum * buf + g`` (the buffer
    starts at zero, so the first buffer equals g exactly, as torch's clone does) and the direction is
    ``g + momentum * buf`` (nesterov) or ``buf``; the update is ``-lr(count) * direction``.

    Args:
        learning_rate: a number >= 0 or a schedule ``count -> lr`` (count = updates already applied).
        momentum: momentum factor, >= 0.
        nesterov: Nesterov momentum (needs momentum > 0).
        weight_decay: L2 penalty coefficient, >= 0.

    Returns:
        A GradientTransformation with :class:`SgdState`.

    Example:
        >>> opt = sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.ones(3)}
        >>> updates, state = opt.update({"w": torch.ones(3)}, opt.init(params), params)
    """
    _check_lr("sgd", learning_rate)
    _check("sgd", "momentum", momentum, _NONNEG, "a finite number >= 0")
    _check("sgd", "weight_decay", weight_decay, _NONNEG, "a finite number >= 0")
    if nesterov and momentum == 0:
        raise ValueError("sgd: nesterov=True needs momentum > 0, got momentum=0; pass momentum=0.9 or nesterov=False.")

    def init(params):
        return SgdState(_zero_count(params), optree.tree_map(torch.zeros_like, params) if momentum != 0 else None)

    def update(updates, state, params=None, *, donate=False):
        g, spec = optree.tree_flatten(updates)
        owned = donate  # whether the buffers in g may be written
        if weight_decay != 0:
            if params is None:
                raise ValueError("sgd: weight_decay > 0 needs the params; call update(updates, state, params).")
            g = _add(g, _flatten_like("sgd", params, spec, "params"), weight_decay, inplace=owned)
            owned = True
        buf, lr = None, _lr_at(learning_rate, state.count)
        u = None
        if momentum != 0:
            buf = _flatten_like("sgd", state.momentum, spec, "state.momentum")
            buf = _scalar_op("mul", buf, momentum, inplace=donate)
            torch._foreach_add_(buf, g)
            if nesterov:
                g = _add(g, buf, momentum, inplace=owned)
                owned = True
            else:  # out of place: buf lives on in the state
                u = _scalar_op("mul", buf, -lr, inplace=False)
        if u is None:
            u = _scalar_op("mul", g, -lr, inplace=owned)
        mom = None if buf is None else optree.tree_unflatten(spec, buf)
        return optree.tree_unflatten(spec, u), SgdState(_next_count(state.count, donate), mom)

    return GradientTransformation(init, update)


