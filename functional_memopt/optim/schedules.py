"""Learning-rate schedules: pure functions of the optimizer's step count.

A schedule maps ``count`` (the number of updates already applied: 0 for the first update) to a
learning rate. Given a Python int it returns a Python float; given a 0-d integer tensor it returns a
0-d float64 tensor on the same device, computed without reading the tensor back to the host, so a
step that holds its count on the GPU never synchronises. ``torch.optim.lr_scheduler.LambdaLR`` with
``lr_lambda = lambda s: schedule(s) / peak`` reproduces the same sequence.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch

__all__ = ["Schedule", "constant_schedule", "linear_warmup", "cosine_decay", "warmup_cosine"]

Scalar = Union[float, torch.Tensor]
Schedule = Callable[[Union[int, torch.Tensor]], Scalar]


def _check_value(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}; pass e.g. {name}=3e-4.")
    return float(value)


def _check_steps(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{fn}: {name} must be an integer >= 0, got {value!r}; pass e.g. {name}=100.")
    return value


def _as_float(count) -> Scalar:
    # float64 keeps the tensor path as exact as the Python path (both are IEEE doubles).
    return count.to(torch.float64) if isinstance(count, torch.Tensor) else float(count)


def _fraction(c: Scalar, steps: int) -> Scalar:
    """min(c, steps) / steps, and 1 when steps == 0 (the phase is already over)."""
    if steps == 0:
        return torch.ones_like(c) if isinstance(c, torch.Tensor) else 1.0
    if isinstance(c, torch.Tensor):
        return torch.clamp(c, max=float(steps)) / steps
    return min(c, float(steps)) / steps


def _cos_interp(peak: float, final: float, t: Scalar) -> Scalar:
    cos = torch.cos(math.pi * t) if isinstance(t, torch.Tensor) else math.cos(math.pi * t)
    return final + (peak - final) * 0.5 * (1.0 + cos)


def constant_schedule(value: float) -> Schedule:
    """A schedule that is ``value`` at every count.

    Args:
        value: the learning rate, >= 0.

    Returns:
        ``count -> value`` (always a Python float).

    Example:
        >>> constant_schedule(0.1)(7)
        0.1
    """
    value = _check_value("constant_schedule", "value", value)
    return lambda count: value


def linear_warmup(peak: float, warmup_steps: int) -> Schedule:
    """Linear ramp from 0 to ``peak`` over ``warmup_steps`` counts, then constant.

    ``lr(c) = peak * min(c, W) / W`` with ``W = warmup_steps`` (``peak`` for every c when W == 0).
    The first update (c = 0) therefore has lr 0, as in optax's and transformers' linear warmup.

    Args:
        peak: learning rate reached at ``c == warmup_steps``, >= 0.
        warmup_steps: length of the ramp, >= 0.

    Returns:
        ``count -> lr``.

    Example:
        >>> linear_warmup(1.0, 4)(1)
        0.25
    """
    peak = _check_value("linear_warmup", "peak", peak)
    warmup_steps = _check_steps("linear_warmup", "warmup_steps", warmup_steps)
    return lambda count: peak * _fraction(_as_float(count), warmup_steps)


def cosine_decay(peak: float, decay_steps: int, *, final: float = 0.0) -> Schedule:
    """Half-cosine from ``peak`` at c = 0 down to ``final`` at c = ``decay_steps``, then constant.

    ``lr(c) = final + (peak - final) * (1 + cos(pi * min(c, D) / D)) / 2`` with ``D = decay_steps``
    (``final`` for every c when D == 0).

    Args:
        peak: learning rate at c = 0, >= 0.
        decay_steps: counts over which to decay, >= 0.
        final: learning rate from ``c == decay_steps`` on, >= 0.

    Returns:
        ``count -> lr``.

    Example:
        >>> cosine_decay(1.0, 10)(5)
        0.5
    """
    peak = _check_value("cosine_decay", "peak", peak)
    final = _check_value("cosine_decay", "final", final)
    decay_steps = _check_steps("cosine_decay", "decay_steps", decay_steps)
    return lambda count: _cos_interp(peak, final, _fraction(_as_float(count), decay_steps))


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, *, final: float = 0.0) -> Schedule:
    """Linear warmup to ``peak``, then cosine decay to ``final`` at ``total_steps`` (nanoGPT's recipe).

    With ``W = warmup_steps`` and ``D = total_steps - W``:
    ``lr(c) = peak * c / W`` for ``c < W``, else
    ``lr(c) = final + (peak - final) * (1 + cos(pi * min(c - W, D) / D)) / 2`` (``final`` when D == 0).
    Both pieces equal ``peak`` at ``c == W`` (when D > 0), so the schedule is continuous there.

    Args:
        peak: the highest learning rate, at ``c == warmup_steps``; >= 0.
        warmup_steps: length of the linear ramp, >= 0.
        total_steps: count at which ``final`` is reached; >= warmup_steps.
        final: learning rate from ``total_steps`` on, >= 0.

    Returns:
        ``count -> lr``.

    Example:
        >>> warmup_cosine(1.0, 2, 12)(7)
        0.5
    """
    fn = "warmup_cosine"
    peak = _check_value(fn, "peak", peak)
    final = _check_value(fn, "final", final)
    warmup_steps = _check_steps(fn, "warmup_steps", warmup_steps)
    total_steps = _check_steps(fn, "total_steps", total_steps)
    if warmup_steps > total_steps:
        raise ValueError(
            f"{fn}: warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps}); "
            "lengthen total_steps or shorten the warmup."
        )
    decay_steps = total_steps - warmup_steps

    def schedule(count):
        c = _as_float(count)
        decay = _cos_interp(peak, final, _fraction(c - warmup_steps, decay_steps))
        if isinstance(c, torch.Tensor):
            # torch.where, not a Python branch, so a device count is never read back.
            warm = peak * c / max(warmup_steps, 1)
            return torch.where(c < warmup_steps, warm, decay)
        return peak * c / warmup_steps if c < warmup_steps else decay

    return schedule
