"""Loss scaling as immutable state: no-op, static and dynamic (the torch.amp.GradScaler rule).

Each loss scale is a NamedTuple of tensors, so optree flattens and rebuilds it with every field
(DeepMind's jmp kept ``min_loss_scale`` out of its flattened ``DynamicLossScale`` and lost it on a
round trip). Methods are pure: ``scale`` and ``unscale`` return new trees, ``adjust`` returns a new
state, and nothing reads a value back to the host, so a step that uses them can be compiled.

Scaled and unscaled trees are computed in at least float32: a float16 loss times the default
scale 2**16 would overflow float16 (largest finite value 65504), and the optimizer wants float32
gradients anyway.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

import optree
import torch

from .._tree import floats_already, tree_map

__all__ = [
    "NoOpLossScale",
    "StaticLossScale",
    "DynamicLossScale",
    "LossScale",
    "no_op_loss_scale",
    "static_loss_scale",
    "dynamic_loss_scale",
    "loss_scale_from_spec",
]

PyTree = Any

def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scale_tree(tree: PyTree, factor, *, donate: bool = False) -> PyTree:
    if not donate:
        return tree_map(
            lambda x: _at_least_fp32(x) * factor if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
        )
    # In place: float32 / float64 leaves are the caller's own; half leaves are widened (a copy) first.
    wide = _cast_tree(tree)
    floats = [x for x in optree.tree_leaves(wide) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if floats:
        torch._foreach_mul_(floats, factor)
    return wide


def _cast_tree(tree: PyTree) -> PyTree:
    if floats_already(tree, lambda x: x.dtype in (torch.float32, torch.float64)):
        return tree  # nothing to widen: the tree itself, as NoOpLossScale.unscale is called every step
    return tree_map(
        lambda x: _at_least_fp32(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    # GradScaler.unscale_ takes the reciprocal in float64 and rounds it to float32 once; for a
    # power-of-two scale it is exact, so unscaling then undoes scaling bit for bit.
    return torch.as_tensor(scale).double().reciprocal().float()


class NoOpLossScale(NamedTuple):
    """No loss scaling: ``scale`` and ``unscale`` only promote floating leaves to float32.

    Example:
        >>> NoOpLossScale().scale(torch.tensor(3.0))
        tensor(3.)
    """

    @property
    def loss_scale(self) -> torch.Tensor:
        """The scale, always 1."""
        return torch.ones((), dtype=torch.float32)

    def scale(self, tree: PyTree) -> PyTree:
        """``tree`` with floating leaves in at least float32."""
        return _cast_tree(tree)

    def unscale(self, tree: PyTree, *, donate: bool = False) -> PyTree:
        """``tree`` with floating leaves in at least float32 (``donate`` changes nothing here)."""
        del donate
        return _cast_tree(tree)

    def adjust(self, grads_finite) -> "NoOpLossScale":
        """The same state: nothing to adjust."""
        del grads_finite
        return self


class StaticLossScale(NamedTuple):
    """A fixed loss scale.

    Example:
        >>> StaticLossScale(torch.tensor(4.0)).unscale(torch.tensor(8.0))
        tensor(2.)
    """

    loss_scale: torch.Tensor  # () float32, > 0

    def scale(self, tree: PyTree) -> PyTree:
        """Every floating leaf times the scale, in at least float32."""
        return _scale_tree(tree, self.loss_scale)

    def unscale(self, tree: PyTree, *, donate: bool = False) -> PyTree:
        """Every floating leaf times ``1 / scale`` (reciprocal rounded once to float32).

        With ``donate`` the float32 / float64 leaves are multiplied in place: pass only a tree you
        own and will not read again (the train step's own accumulator).
        """
        return _scale_tree(tree, _inverse(self.loss_scale), donate=donate)

    def adjust(self, grads_finite) -> "StaticLossScale":
        """The same state: a static scale never changes."""
        del grads_finite
        return self


class DynamicLossScale(NamedTuple):
    """A loss scale that backs off on overflow and grows after a run of finite steps.

    ``adjust`` is ``torch.amp.GradScaler.update`` (the ``torch._amp_update_scale_`` kernel) plus a
    floor. On non-finite gradients: scale *= backoff_factor, counter = 0. On finite gradients:
    counter += 1, and when it reaches growth_interval: scale *= growth_factor (kept only if the
    product is finite) and counter = 0. Products are taken in float64 and rounded to float32 once,
    as the kernel does. The floor: after a backoff the scale is at least ``min_loss_scale``.
    GradScaler has no floor, so with ``min_loss_scale=0`` this follows GradScaler for any sequence
    of finite and non-finite steps; with the default floor 1.0 it follows GradScaler as long as
    GradScaler's own scale stays >= 1 (below 1 a scale only makes fp16 underflow worse).
    GradScaler tests the scaled gradients for inf/nan; with a scale >= 1 testing the unscaled ones
    gives the same answer (multiplying by 1/scale <= 1 neither makes nor removes an inf).

    Build one with :func:`dynamic_loss_scale`, which validates the hyper-parameters. They are
    tensors too, so the whole state can be saved, broadcast or selected leaf by leaf.

    Example:
        >>> ls = dynamic_loss_scale(8.0, growth_interval=1)
        >>> float(ls.adjust(torch.tensor(True)).loss_scale), float(ls.adjust(torch.tensor(False)).loss_scale)
        (16.0, 4.0)
    """

    loss_scale: torch.Tensor  # () float32, current scale, >= min_loss_scale
    counter: torch.Tensor  # () int64, consecutive finite steps since the last change, < growth_interval
    growth_interval: torch.Tensor  # () int64, finite steps before the scale grows, >= 1
    growth_factor: torch.Tensor  # () float64, > 1 (float64: GradScaler multiplies by a Python float)
    backoff_factor: torch.Tensor  # () float64, in (0, 1)
    min_loss_scale: torch.Tensor  # () float32, >= 0, the floor of the scale

    # Scaling is the same as a static scale's; only ``adjust`` differs.
    scale = StaticLossScale.scale
    unscale = StaticLossScale.unscale

    def adjust(self, grads_finite) -> "DynamicLossScale":
        """The next state after a step whose gradients were finite or not.

        Args:
            grads_finite: 0-d bool tensor (or Python bool), e.g. the step's finite flag.

        Returns:
            A new DynamicLossScale; hyper-parameter fields are carried over unchanged.
        """
        scale = self.loss_scale
        finite = torch.as_tensor(grads_finite, device=scale.device).to(torch.bool)
        bumped = self.counter + 1
        grow = finite & (bumped == self.growth_interval)
        grown = (scale.double() * self.growth_factor).float()
        # The kernel refuses to grow past the float32 range; the counter still restarts.
        grown = torch.where(torch.isfinite(grown), grown, scale)
        backed = torch.maximum((scale.double() * self.backoff_factor).float(), self.min_loss_scale)
        new_scale = torch.where(finite, torch.where(grow, grown, scale), backed)
        new_counter = torch.where(finite & ~grow, bumped, torch.zeros_like(bumped))
        return self._replace(loss_scale=new_scale, counter=new_counter)


LossScale = Union[NoOpLossScale, StaticLossScale, DynamicLossScale]


def _number(fn: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a Python number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value!r}.")
    return float(value)


def _check_scale(fn: str, name: str, value) -> float:
    value = _number(fn, name, value)
    if not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}; pass e.g. {name}=2.0**16.")
    if not math.isfinite(float(torch.tensor(value, dtype=torch.float32))):
        raise ValueError(f"{fn}: {name}={value!r} overflows float32; pass a value below 3.4e38.")
    return value


def no_op_loss_scale() -> NoOpLossScale:
    """A loss scale that does nothing (bf16 and fp32 training need none).

    Example:
        >>> no_op_loss_scale().adjust(torch.tensor(False))
        NoOpLossScale()
    """
    return NoOpLossScale()


def static_loss_scale(loss_scale: float, *, device: torch.device | str | None = None) -> StaticLossScale:
    """A fixed loss scale.

    Args:
        loss_scale: the scale, a finite number > 0 (a power of two keeps unscaling exact).
        device: where the scale tensor lives (that of the loss).

    Returns:
        StaticLossScale with a () float32 tensor.

    Example:
        >>> static_loss_scale(128.0).loss_scale
        tensor(128.)
    """
    value = _check_scale("static_loss_scale", "loss_scale", loss_scale)
    return StaticLossScale(torch.tensor(value, dtype=torch.float32, device=device))


def dynamic_loss_scale(
    initial: float = 2.0**16,
    *,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    min_loss_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> DynamicLossScale:
    """A dynamic loss scale with torch.amp.GradScaler's defaults and a floor.

    Args:
        initial: first scale, finite, > 0 and >= min_loss_scale.
        growth_factor: multiplier after ``growth_interval`` finite steps in a row, > 1.
        backoff_factor: multiplier after a non-finite step, in (0, 1).
        growth_interval: finite steps in a row before growing, an int >= 1.
        min_loss_scale: the floor after a backoff, >= 0 (0 means none, exactly as GradScaler).
        device: where the state's tensors live (that of the loss).

    Returns:
        DynamicLossScale with counter 0.

    Example:
        >>> ls = dynamic_loss_scale()
        >>> float(ls.loss_scale), int(ls.growth_interval)
        (65536.0, 2000)
    """
    fn = "dynamic_loss_scale"
    initial = _check_scale(fn, "initial", initial)
    growth_factor = _number(fn, "growth_factor", growth_factor)
    backoff_factor = _number(fn, "backoff_factor", backoff_factor)
    min_loss_scale = _number(fn, "min_loss_scale", min_loss_scale)
    if not growth_factor > 1:
        raise ValueError(f"{fn}: growth_factor must be > 1, got {growth_factor!r}; pass e.g. growth_factor=2.0.")
    if not 0 < backoff_factor < 1:
        raise ValueError(
            f"{fn}: backoff_factor must be in (0, 1), got {backoff_factor!r}; pass e.g. backoff_factor=0.5."
        )
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int):
        raise TypeError(f"{fn}: growth_interval must be an int, got {type(growth_interval).__name__}.")
    if growth_interval < 1:
        raise ValueError(
            f"{fn}: growth_interval must be an int >= 1, got {growth_interval!r}; pass e.g. growth_interval=2000."
        )
    if min_loss_scale < 0:
        raise ValueError(f"{fn}: min_loss_scale must be >= 0, got {min_loss_scale!r}; pass 0 for no floor.")
    if min_loss_scale > initial:
        raise ValueError(
            f"{fn}: min_loss_scale ({min_loss_scale!r}) must not exceed initial ({initial!r}); "
            "raise initial or lower min_loss_scale."
        )
    return DynamicLossScale(
        loss_scale=torch.tensor(initial, dtype=torch.float32, device=device),
        counter=torch.zeros((), dtype=torch.int64, device=device),
        growth_interval=torch.tensor(growth_interval, dtype=torch.int64, device=device),
        growth_factor=torch.tensor(growth_factor, dtype=torch.float64, device=device),
        backoff_factor=torch.tensor(backoff_factor, dtype=torch.float64, device=device),
        min_loss_scale=torch.tensor(min_loss_scale, dtype=torch.float32, device=device),
    )


def loss_scale_from_spec(spec: str | float, *, device: torch.device | str | None = None) -> LossScale:
    """The loss scale a spec names: "none", "dynamic" (GradScaler's defaults), or a static number.

    The one reader of loss-scale specs (the command line and run configs use it).

    Example:
        >>> float(loss_scale_from_spec("1024").loss_scale)
        1024.0
    """
    text = str(spec).strip().lower()
    if text == "none":
        return no_op_loss_scale()
    if text == "dynamic":
        return dynamic_loss_scale(device=device)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise ValueError(f"loss_scale_from_spec: a loss scale is none, dynamic or a number > 0, got {spec!r}.")
    return static_loss_scale(value, device=device)
