"""The step's guard against non-finite updates: finite gradients can still make a non-finite update.

The step skips non-finite *gradients* (the overflow check), but an update computed from finite
gradients can still overflow: a learning rate that is far too large, or a damaged optimizer state
(a negative second moment gives NaN at the square root). :func:`nonfinite_leaves` checks the new
params and optimizer state in one pass (one multi-tensor norm per dtype, one host sync: ~0.2% of a
tiny-preset step, benchmarks/checks_bench.py); only when a norm is not finite does it look leaf by
leaf, so a huge but finite value whose square overflows is not mistaken for an inf.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from .._tree import tree_flatten_with_paths

__all__ = ["NonFiniteUpdateError", "nonfinite_leaves"]


class NonFiniteUpdateError(ValueError):
    """A donated step's update would leave inf or nan in the state; the state passed in is unusable.

    Attributes:
        leaves: the dotted paths of the leaves that hold inf or nan ("params.wte", "opt_state.nu.wpe", ...).
        step: the update's number (the state's ``step`` + 1).
    """

    def __init__(self, message: str, *, leaves: list[str], step: int) -> None:
        super().__init__(message)
        self.leaves = leaves
        self.step = step


def _floats(tree: Any) -> list[torch.Tensor]:
    return [x for x in optree.tree_leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()]


def nonfinite_leaves(params: Any, opt_state: Any) -> list[str]:
    """The dotted paths ("params.…", "opt_state.…") of leaves that hold inf or nan; [] when all are finite."""
    leaves = _floats((params, opt_state))
    if not leaves:
        return []
    flags = []
    for wide in (False, True):  # float64 leaves keep their norm; the others are normed in float32
        group = [x for x in leaves if (x.dtype == torch.float64) == wide]
        if group:
            norms = torch._foreach_norm(group, 2, dtype=None if wide else torch.float32)
            flags.append(torch.isfinite(torch.stack(norms)).all())
    if bool(flags[0] if len(flags) == 1 else torch.stack(flags).all()):  # the one host sync
        return []
    named = tree_flatten_with_paths({"params": params, "opt_state": opt_state})
    return [k for k, v in named.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
