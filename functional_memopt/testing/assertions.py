"""Tree-aware assertions that a memory technique changed memory, not mathematics.

Each takes *your* ``loss_fn(params, batch) -> (loss_sum, count)`` or *your* ``step(state, batch)``.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from .._tree import tree_paths
from ..data.batch import split_microbatches
from ..train.accumulate import accumulate_gradients
from ..train.grad import value_and_grad
from ..train.precision import get_policy, with_policy
from .tolerances import GRAD_TOLERANCE_FACTOR, LOSS_TOLERANCE_FACTOR, relative_error, tolerance

__all__ = ["assert_trees_close", "assert_trees_equal", "assert_accumulation_equivalent", "assert_precision_close",
           "assert_skipped_step_is_noop", "assert_steps_equivalent", "poison"]


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 0.0, atol: float = 0.0, msg: str = "") -> None:
    """Assert two pytrees have the same structure, then leafwise equal within tolerances.

    Tolerances of zero mean bit-identical values (nan equal to nan). Non-tensor leaves must be
    equal. The error names the first differing leaf by its key path and the largest difference.
    """
    la, sa = optree.tree_flatten(actual)
    le, se = optree.tree_flatten(expected)
    if sa != se:
        raise AssertionError(f"{msg}tree structures differ:\n  actual:   {sa}\n  expected: {se}")
    for path, a, e in zip(tree_paths(actual), la, le):
        name = path or "<root>"
        if isinstance(a, torch.Tensor) or isinstance(e, torch.Tensor):
            a_t, e_t = torch.as_tensor(a), torch.as_tensor(e)
            if a_t.shape != e_t.shape:
                raise AssertionError(f"{msg}leaf {name}: shapes differ, {tuple(a_t.shape)} vs {tuple(e_t.shape)}")
            if a_t.dtype != e_t.dtype:
                raise AssertionError(f"{msg}leaf {name}: dtypes differ, {a_t.dtype} vs {e_t.dtype}")
            if rtol == 0.0 and atol == 0.0:
                same = torch.equal(a_t, e_t) or (
                    a_t.is_floating_point()
                    and bool(((a_t == e_t) | (torch.isnan(a_t) & torch.isnan(e_t))).all())
                )
                if not same:
                    diff = (a_t.double() - e_t.double()).abs().nan_to_num(float("inf")).max().item()
                    raise AssertionError(f"{msg}leaf {name}: not bit-identical (max abs diff {diff:.3e})")
            else:
                try:
                    torch.testing.assert_close(a_t, e_t, rtol=rtol, atol=atol, equal_nan=True)
                except AssertionError as err:
                    raise AssertionError(f"{msg}leaf {name}: {err}") from None
        elif a != e:
            raise AssertionError(f"{msg}leaf {name}: {a!r} != {e!r}")


def assert_trees_equal(actual: Any, expected: Any, *, msg: str = "") -> None:
    """Assert two pytrees are bit-identical (same structure, dtypes, shapes and bits)."""
    assert_trees_close(actual, expected, rtol=0.0, atol=0.0, msg=msg)


def poison(loss_fn, value: float):
    """``loss_fn`` whose loss sum is multiplied by ``value`` (e.g. inf): gradients become non-finite.

    Example:
        >>> bad = poison(lambda p, b: ((p * b).sum(), torch.tensor(1.0)), float("inf"))
    """

    def poisoned(params, batch):
        loss_sum, count = loss_fn(params, batch)
        return loss_sum * value, count

    return poisoned


def _grad_of_mean(loss_fn, params, batch):
    """The full-batch mean-loss gradient by plain ``torch.autograd.grad``: no library grad engine or fold."""
    leaves, spec = optree.tree_flatten(params)
    live = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves]
    with torch.enable_grad():
        s, c = loss_fn(optree.tree_unflatten(spec, live), batch)
        wrt = [x for x in live if x.requires_grad]
        grads = iter(torch.autograd.grad(s / c.clamp(min=1), wrt, allow_unused=True))
    full = [(next(grads) if x.requires_grad else None) for x in live]
    full = [torch.zeros_like(x) if g is None else g for x, g in zip(live, full)]
    return optree.tree_unflatten(spec, [g.detach() for g in full])


def assert_accumulation_equivalent(loss_fn, params, batch, k: int, *, rtol: float | None = None,
                                   atol: float | None = None) -> None:
    """Assert that folding ``k`` micro-batches gives the full-batch, token-weighted gradient.

    The fold is the library's (``value_and_grad`` per micro-batch, ``accumulate_gradients``,
    divided by the total count); the full-batch gradient it is held against is computed without
    them, by plain ``torch.autograd.grad`` of ``loss_sum / count`` over the whole batch.

    Args:
        loss_fn: ``loss_fn(params, batch) -> (loss_sum, count)``, yours or the library's.
        params: the params pytree.
        batch: a NamedTuple of (B, ...) tensors that ``split_microbatches`` can split.
        k: number of micro-batches (need not divide B).
        rtol, atol: default 1e-10 for float64 params and 1e-5 for float32.
    """

    dtype = optree.tree_leaves(params)[0].dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    rtol = tol if rtol is None else rtol
    atol = tol if atol is None else atol
    full = _grad_of_mean(loss_fn, params, batch)
    def with_aux(p, mb):
        out = loss_fn(p, mb)
        return out[0], out

    grad_fn = value_and_grad(with_aux, has_aux=True)
    acc = accumulate_gradients(grad_fn, params, split_microbatches(batch, k))
    folded = optree.tree_map(lambda g: (g / acc.count.clamp(min=1).to(g.dtype)).to(dtype), acc.grads)
    assert_trees_close(folded, full, rtol=rtol, atol=atol, msg=f"accumulation over {k} micro-batches: ")


def assert_precision_close(loss_fn, params, batch, policy, *, loss_factor: float | None = None,
                           grad_factor: float | None = None, mode: str = "cast") -> None:
    """Assert a reduced-precision run of ``loss_fn`` stays within epsilon-derived tolerances of fp32.

    The mean loss must agree within ``loss_factor * eps`` relative and the gradient within
    ``grad_factor * eps`` relative L2 error, eps being the compute dtype's machine epsilon (the
    library's default factors are documented in ``functional_memopt._precision``).
    """

    pol = get_policy(policy)
    dtype = pol.compute_dtype
    loss_tol = tolerance(dtype, factor=loss_factor or LOSS_TOLERANCE_FACTOR)
    grad_tol = tolerance(dtype, factor=grad_factor or GRAD_TOLERANCE_FACTOR)
    fp32 = optree.tree_map(lambda x: x.float() if x.is_floating_point() else x, params)

    def mean_of(fn):

        def mean(p):
            s, c = fn(p, batch)
            return s.float() / c.float().clamp(min=1)

        return value_and_grad(mean)(fp32)

    ref_loss, ref_grads = mean_of(loss_fn)
    low_loss, low_grads = mean_of(with_policy(loss_fn, pol, mode=mode))
    loss_err = abs(float(low_loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-12)
    if not loss_err <= loss_tol:
        raise AssertionError(f"policy {pol}: loss relative error {loss_err:.3e} > tolerance {loss_tol:.3e}")
    grad_err = relative_error(low_grads, ref_grads)
    if not grad_err <= grad_tol:
        raise AssertionError(f"policy {pol}: gradient relative error {grad_err:.3e} > tolerance {grad_tol:.3e}")


def assert_skipped_step_is_noop(step, state, batch) -> dict:
    """Assert ``step`` reports a skip and changes nothing but the loss scale.

    Give it a state/batch whose gradients are non-finite (e.g. a step built on ``poison(loss_fn,
    inf)``, or fp16 with a huge loss scale). Params, optimizer state and step count must come back
    bit-identical; the inputs must be unmutated. Returns the metrics.
    """
    before = optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
    new, metrics = step(state, batch)
    if not bool(metrics["skipped"]):
        raise AssertionError("the step did not report skipped=True; its gradients were finite")
    assert_trees_equal(new._replace(loss_scale=None), before._replace(loss_scale=None), msg="skipped step: ")
    assert_trees_equal(state, before, msg="skipped step mutated its input: ")
    return metrics


def assert_steps_equivalent(step_a, step_b, state, batches, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Run two steps side by side over ``batches`` and assert their states stay close."""
    sa, sb = state, state
    for i, batch in enumerate(batches):
        sa, _ = step_a(sa, batch)
        sb, _ = step_b(sb, batch)
        assert_trees_close(sa, sb, rtol=rtol, atol=atol, msg=f"after step {i + 1}: ")
