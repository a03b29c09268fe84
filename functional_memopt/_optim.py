"""Optimizers as gradient transformations: pure ``init`` / ``update`` pairs, in the optax style.

``update`` maps gradients to *updates* that :func:`apply_updates` adds to the params, so optimizers
return the negative step. Hyper-parameters live in the factory's closure; the state holds tensors
only. The arithmetic runs as multi-tensor ``torch._foreach_*`` ops over the flat leaf lists, and
for AdamW as torch's fused kernel where it can (see ``_adamw.py``).

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

from ._adamw import adamw_update
from ._tree import tree_global_norm

__all__ = [
    "GradientTransformation", "EmptyState", "ScaleByAdamState", "SgdState", "chain", "sgd", "adamw",
    "clip_by_global_norm", "apply_updates", "decay_mask",
]

PyTree = Any
LearningRate = Union[float, Callable[[Any], Any]]
_NONNEG = lambda v: math.isfinite(v) and v >= 0  # noqa: E731
_POS = lambda v: math.isfinite(v) and v > 0  # noqa: E731


class GradientTransformation(NamedTuple):
    """A pair of pure functions: ``init(params) -> state`` and ``update`` below.

    ``update(updates, state, params=None, *, donate=False) -> (updates, new_state)``.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple]


class EmptyState(NamedTuple):
    """The state of a stateless transformation (no fields)."""


class ScaleByAdamState(NamedTuple):
    """State of :func:`adamw`."""

    count: torch.Tensor  # () int64: updates applied so far, on the params' device
    mu: PyTree  # like params (same shapes and dtypes): first-moment running average
    nu: PyTree  # like params (same shapes and dtypes): second-moment running average


class SgdState(NamedTuple):
    """State of :func:`sgd`."""

    count: torch.Tensor  # () int64: updates applied so far, on the params' device
    momentum: PyTree  # like params, or None when momentum == 0: the momentum buffer


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
        >>> opt = chain(clip_by_global_norm(1.0), adamw(3e-4))
    """

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, *, donate=False):
        if len(state) != len(transforms):
            raise ValueError(
                f"chain: state has {len(state)} entries for {len(transforms)} transforms; "
                "pass the state made by this chain's init(params)."
            )
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, donate=donate)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


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
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return optree.tree_unflatten(spec, _scalar_op("mul", leaves, scale, inplace=donate)), state

    return GradientTransformation(init, update)


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


def decay_mask(params: PyTree) -> PyTree:
    """A bool tree like ``params``: True for matrices (dim >= 2) except the embeddings wte and wpe.

    In this library's params that selects the 2-D linear weights and leaves out biases, layer
    norms, the tied token embedding ``wte`` and the position table ``wpe`` (nanoGPT's split).

    Example:
        >>> decay_mask({"wte": torch.ones(4, 2), "ln_f": {"weight": torch.ones(2)}, "h": [{"w": torch.ones(2, 2)}]})
        {'wte': False, 'ln_f': {'weight': False}, 'h': [{'w': True}]}
    """
    paths, leaves, spec = optree.tree_flatten_with_path(params)
    flags = [x.dim() >= 2 and not (path and path[-1] in ("wte", "wpe")) for path, x in zip(paths, leaves)]
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
        A GradientTransformation with :class:`ScaleByAdamState`.

    Example:
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

    def update(updates, state, params=None, *, donate=False):
        g, spec = optree.tree_flatten(updates)
        mu = _flatten_like(fn, state.mu, spec, "state.mu")
        nu = _flatten_like(fn, state.nu, spec, "state.nu")
        idx = decayed(params, spec)
        p = _flatten_like(fn, params, spec, "params") if idx else None
        lr = _lr_at(learning_rate, state.count)
        count = _next_count(state.count, donate)
        u, mu, nu = adamw_update(g, mu, nu, p, idx, count, lr, b1=b1, b2=b2, eps=eps,
                                 weight_decay=weight_decay, donate=donate)
        unflat = lambda xs: optree.tree_unflatten(spec, xs)  # noqa: E731
        return unflat(u), ScaleByAdamState(count, unflat(mu), unflat(nu))

    return GradientTransformation(init, update)


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
