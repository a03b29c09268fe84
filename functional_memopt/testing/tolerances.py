"""Tolerances derived from a dtype's epsilon, and the relative error they bound.

A reduced-precision run is compared with the float32 run of the same function; the allowed
relative difference is a factor times the compute dtype's machine epsilon, the factor derived
below from how rounding errors add up, and checked against measurement.
"""

from __future__ import annotations

from typing import Any

import torch

from .._tree import tree_leaves, tree_map

__all__ = ["tolerance", "relative_error", "LOSS_TOLERANCE_FACTOR", "GRAD_TOLERANCE_FACTOR"]

PyTree = Any

# Tolerance factors, in units of the compute dtype's epsilon, for a reduced-precision run against
# the float32 run of the same function, at initialisation-scale weights. Each op rounds its result
# once (unit roundoff eps/2; matmuls accumulate in float32), and independent roundings add like a
# random walk, so n rounded ops in a chain drift by about eps/2 * sqrt(n).
# Loss: float32 cross-entropy of rounded logits, summed over tokens whose rounding errors mostly
# cancel. Measured at most 0.12 eps (mixed bf16 and fp16, cast and autocast, over 1,500 random
# small configs and the tiny and small presets); 2 eps leaves a 16x margin and still notices one
# token in a hundred gone missing under fp16.
# Gradients (relative L2 error over the whole tree): each leaf comes out of a forward and a
# backward chain of some 10 to 20 rounded ops per block; measured at most 2.5 eps over 1,200
# random configs (vocab >= 16, n_embd >= 4, >= 8 tokens), 1.0 on tiny, 1.3 on small. 8 eps leaves
# a 3x margin, while a real bug (a lost term or a wrong cast, an O(1) relative error) is 128 bf16
# eps or 1024 fp16 eps. A relative error needs a gradient that is not mostly cancellation: with a
# vocabulary of 2 and two tokens whose targets differ, the float32 gradient is nearly zero and the
# error reached 450 eps; layer norm of one feature (n_embd = 1) has no gradient at all.
LOSS_TOLERANCE_FACTOR = 2.0
GRAD_TOLERANCE_FACTOR = 8.0


def tolerance(dtype: torch.dtype, *, factor: float) -> float:
    """``factor`` times the machine epsilon of ``dtype``: a relative tolerance.

    Args:
        dtype: the compute dtype of the reduced-precision run.
        factor: how many epsilons to allow (see LOSS_TOLERANCE_FACTOR, GRAD_TOLERANCE_FACTOR).

    Returns:
        A Python float.

    Example:
        >>> tolerance(torch.bfloat16, factor=8)
        0.0625
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"tolerance: dtype must be a floating torch.dtype, got {dtype!r}.")
    if not factor > 0:
        raise ValueError(f"tolerance: factor must be > 0, got {factor!r}.")
    return float(factor) * torch.finfo(dtype).eps


def relative_error(actual: PyTree, expected: PyTree) -> float:
    """The relative L2 error ``||actual - expected|| / ||expected||`` over all floating leaves.

    Computed in float64 so that the measuring adds no error of its own; the trees must have the
    same structure. Reads the result back to the host (meant for tests and reports).

    Example:
        >>> relative_error(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0]))
        0.1
    """
    diff = tree_map(lambda a, e: (a.double() - e.double()).square().sum() if e.is_floating_point() else None,
                    actual, expected)
    ref = tree_map(lambda e: e.double().square().sum() if e.is_floating_point() else None, expected)
    num = sum((d for d in tree_leaves(diff)), torch.zeros((), dtype=torch.float64))
    den = sum((r for r in tree_leaves(ref)), torch.zeros((), dtype=torch.float64))
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float((num / den).sqrt())
