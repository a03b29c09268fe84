"""Gradient clipping by the global norm: the one place the clip coefficient is computed.

``clip_by_global_norm`` (an optimizer transformation) and the train step's ``max_grad_norm`` both
scale by :func:`clip_scale`, torch's ``clip_grad_norm_`` rule.
"""

from __future__ import annotations

import optree
import torch

from .._tree import tree_global_norm
from .base import _POS, EmptyState, GradientTransformation, _check, _device_of, _scalar_op

__all__ = ["clip_scale", "clip_leaves", "clip_by_global_norm"]


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` on the norm's device, as ``torch.nn.utils.clip_grad_norm_``.

    Example:
        >>> float(clip_scale(torch.tensor(4.0), 2.0))
        0.49999988079071045
    """
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_leaves(leaves: list, norm: torch.Tensor, max_norm: float, *, inplace: bool) -> list:
    """Every leaf times :func:`clip_scale` (cast to its dtype), in place or into new tensors."""
    return _scalar_op("mul", leaves, clip_scale(norm, max_norm), inplace=inplace)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the updates so their global L2 norm is at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``.

    ``scale = min(1, max_norm / (norm + 1e-6))``, computed on the device (no host sync) and applied
    to every leaf, including when it is 1.

    Args:
        max_norm: the largest allowed global norm, > 0.

    Returns:
        A GradientTransformation with :class:`EmptyState`.

    Example:
        >>> clip = clip_by_global_norm(1.0)
        >>> g, _ = clip.update({"w": torch.full((4,), 3.0)}, clip.init(None))
    """
    _check("clip_by_global_norm", "max_norm", max_norm, _POS, "a finite number > 0")

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, *, donate=False):
        leaves, spec = optree.tree_flatten(updates)
        norm = tree_global_norm(updates).to(_device_of(leaves))
        return optree.tree_unflatten(spec, clip_leaves(leaves, norm, max_norm, inplace=donate)), state

    return GradientTransformation(init, update)


