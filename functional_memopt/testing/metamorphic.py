"""Metamorphic assertions on a whole training step: relations that hold whatever the values are.

A point comparison needs an expected value someone trusts; a metamorphic relation needs only the
step under test, run on two inputs that must give the same answer. Each assertion here takes
*your* ``step(state, batch) -> (state, metrics)`` (or a factory of steps) with a state that is a
NamedTuple with ``params`` and ``loss_scale`` fields, as :class:`functional_memopt.TrainState`.

- :func:`assert_loss_scale_invariant`: without overflow, a static power-of-two loss scale S does
  not change the update. Catches clipping by the scaled norm, and unscaling missed or done twice.
- :func:`assert_accumulation_invariant`: k micro-batches give the step that one batch gives.
  Catches a mean of per-micro-batch means, a lost or doubled micro-batch.
- :func:`assert_mask_equivalent`: a target whose loss mask is 0 counts exactly as a target set to
  IGNORE_INDEX. Catches a token count or a loss that ignores the mask.
- :func:`assert_master_precision`: an update below half an ulp of the compute dtype still moves
  the higher-precision masters, in proportion to the learning rate. Catches masters stored in, or
  rounded to, the compute dtype.

Adam divides each gradient element by its own running magnitude, so a relation between two runs
whose gradients differ by rounding (accumulation) can fail on an element whose true gradient is
zero (the attention key bias): its rounding noise becomes a full learning-rate step of either
sign. Check such relations with SGD, or in float64; the exact relations (loss scale, mask) hold
for any optimizer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .._tree import tree_leaves, tree_map
from ..data.batch import IGNORE_INDEX
from ..train.loss_scale import static_loss_scale
from .assertions import assert_trees_close, assert_trees_equal

__all__ = ["assert_loss_scale_invariant", "assert_accumulation_invariant", "assert_mask_equivalent",
           "assert_master_precision", "update_error"]

_METRICS = ("loss", "grad_norm", "tokens", "skipped")  # compared when the step reports them


def _clone(tree: Any) -> Any:
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _run(step: Callable, state: Any, batch: Any) -> tuple[Any, dict]:
    # On a copy, so that a step built with donate=True cannot spend the caller's state.
    return step(_clone(state), batch)


def _metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in _METRICS if isinstance(metrics, dict) and k in metrics}


def _not_skipped(metrics: dict, what: str) -> None:
    if isinstance(metrics, dict) and "skipped" in metrics and bool(metrics["skipped"]):
        raise AssertionError(f"{what}: the step skipped (non-finite gradients), so the relation says nothing; "
                             "choose inputs and scales without overflow.")


def _rounding_of_params(new: Any, old: Any) -> float:
    """``||eps(dtype) * new|| / ||new - old||`` over the floating leaves: what rounding ``old + update``
    to the params' dtype can add to an update's relative L2 error (two roundings of half an ulp)."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for n, o in zip(tree_leaves(new), tree_leaves(old)):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            num += (n.double() * torch.finfo(n.dtype).eps).square().sum()
            den += (n.double() - o.double()).square().sum()
    return 0.0 if den == 0 else float((num / den).sqrt())


def update_error(new: Any, expected: Any, old: Any) -> float:
    """``||(new - old) - (expected - old)|| / ||expected - old||`` over all floating leaves, in float64.

    The relative L2 error of an *update*: comparing params themselves would hide a step that barely
    moves them, since ``new`` and ``old`` agree to many digits anyway.

    Example:
        >>> old = {"w": torch.zeros(2)}
        >>> update_error({"w": torch.tensor([1.0, 1.1])}, {"w": torch.tensor([1.0, 1.0])}, old)
        0.0707...
    """
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for n, e, o in zip(tree_leaves(new), tree_leaves(expected), tree_leaves(old)):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            num += (n.double() - e.double()).square().sum()
            den += (e.double() - o.double()).square().sum()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float((num / den).sqrt())


def assert_loss_scale_invariant(step: Callable, state: Any, batch: Any, *, scales=(2.0**4, 2.0**12),
                                rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that a static power-of-two loss scale changes neither the update nor the metrics.

    Runs ``step`` from ``state`` with its ``loss_scale`` replaced by ``static_loss_scale(S)`` for
    each S. Multiplying by a power of two is exact in binary floating point, so without overflow
    or underflow ``unscale(grad(S * loss)) == grad(loss)`` bit for bit (invariant 2), and the new
    params, optimizer state and step count, and the loss, gradient norm and token metrics must
    agree: bitwise by default. Even Adam, which normalises a constant factor almost away, leaves
    a trace through its epsilon that a bitwise comparison sees.

    What it catches: clipping by the *scaled* norm (give the step a ``max_grad_norm`` below the
    gradient norm so that clipping acts), a missing unscale (the update grows with S), a double
    one (it shrinks with S). Bitwise equality needs the compute dtype's range: float32 and
    bfloat16 compute have float32's; under float16 compute pick scales at which no gradient
    underflows, or pass tolerances.

    Args:
        step: ``step(state, batch) -> (state, metrics)``.
        state: a NamedTuple with a ``loss_scale`` field (e.g. a TrainState).
        batch: a batch the step takes.
        scales: two or more powers of two.
        rtol, atol: tolerances for the comparison (0: bitwise).

    Example:
        >>> import functional_memopt as fm
        >>> cfg = fm.ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
        >>> opt = fm.sgd(0.1)
        >>> step = fm.make_train_step(cfg, opt, max_grad_norm=0.01)
        >>> state = fm.init_train_state(fm.init_params(cfg), opt)
        >>> assert_loss_scale_invariant(step, state, fm.sample_batch(torch.arange(64) % 16, 2, 8, seed=0, index=0))
    """
    scales = [float(s) for s in scales]
    if len(set(scales)) < 2:
        raise ValueError(f"assert_loss_scale_invariant: pass two or more different scales, got {scales}.")
    bad = [s for s in scales if not (s > 0 and math.isfinite(s) and math.frexp(s)[0] == 0.5)]
    if bad:
        raise ValueError(f"assert_loss_scale_invariant: scales must be powers of two (exact to unscale), got {bad}.")
    device = tree_leaves(state.params)[0].device
    runs = []
    for s in scales:
        new, metrics = _run(step, state._replace(loss_scale=static_loss_scale(s, device=device)), batch)
        _not_skipped(metrics, f"loss scale {s:g}")
        runs.append((s, new._replace(loss_scale=None), _metrics(metrics)))
    s0, new0, m0 = runs[0]
    for s, new, m in runs[1:]:
        what = f"loss scale {s:g} against {s0:g}: "
        assert_trees_close(m, m0, rtol=rtol, atol=atol, msg=what + "metric ")
        assert_trees_close(new, new0, rtol=rtol, atol=atol, msg=what)


def assert_accumulation_invariant(make_step: Callable[[int], Callable], state: Any, batch: Any, ks=(2,), *,
                                  rtol: float | None = None, atol: float = 0.0) -> None:
    """Assert that the step with k micro-batches gives the step with one: the update and the metrics.

    ``make_step(k)`` builds the step that splits each batch into k micro-batches. The update
    (new params minus old) must agree with k = 1 within ``rtol`` in relative L2 error (see
    :func:`update_error`), the token count exactly, and the loss and gradient norm within ``rtol``.
    Micro-batches only reassociate sums, so the error is rounding: by default 8 epsilons of the
    params' dtype (``GRAD_TOLERANCE_FACTOR``), which suits float32 and float64 compute. With a
    half-precision compute dtype each micro-batch's weight gradient is rounded to it, so pass
    ``rtol=tolerance(compute_dtype, factor=GRAD_TOLERANCE_FACTOR)``. Use SGD or float64 params
    with Adam-like optimizers (see the module docstring). The new params are ``p + u`` rounded to
    the params' dtype, so two updates that differ in their last bits can round to params an ulp
    apart: the bound adds that rounding, ``eps(dtype) * ||p_new||`` over the update's norm (it
    matters when the update is small beside the params, e.g. layer-norm weights of 1 under a
    clipped step).

    What it catches: averaging per-micro-batch mean losses (wrong whenever the micro-batches hold
    different numbers of tokens), a dropped, repeated or unnormalised micro-batch.

    Args:
        make_step: ``k -> step``.
        state: the state to start from.
        batch: a batch with at least ``max(ks)`` rows; give it ragged token counts.
        ks: micro-batch counts to compare with 1.
        rtol: relative tolerance for the update, loss and gradient norm.
        atol: absolute tolerance added to the loss and gradient norm comparisons.
    """
    from .tolerances import GRAD_TOLERANCE_FACTOR, tolerance

    if rtol is None:
        rtol = tolerance(tree_leaves(state.params)[0].dtype, factor=GRAD_TOLERANCE_FACTOR)
    ref, m_ref = _run(make_step(1), state, batch)
    _not_skipped(m_ref, "k = 1")
    m_ref = _metrics(m_ref)
    for k in ks:
        new, m = _run(make_step(k), state, batch)
        _not_skipped(m, f"k = {k}")
        m = _metrics(m)
        err = update_error(new.params, ref.params, state.params)
        bound = rtol + _rounding_of_params(ref.params, state.params)
        if not err <= bound:
            raise AssertionError(f"{k} micro-batches against 1: the update differs by {err:.3e} (relative L2), "
                                 f"more than {bound:.3e} ({rtol:.3e} plus the rounding of the new params)")
        if "tokens" in m_ref:
            assert_trees_equal(m["tokens"], m_ref["tokens"], msg=f"{k} micro-batches against 1: tokens ")
        for key in ("loss", "grad_norm"):
            if key in m_ref:
                assert_trees_close(m[key], m_ref[key], rtol=rtol, atol=atol,
                                   msg=f"{k} micro-batches against 1: {key} ")


def assert_mask_equivalent(step: Callable, state: Any, batch: Any, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that a target with loss mask 0 counts exactly as a target set to IGNORE_INDEX.

    Builds a second batch from ``batch``: every target whose mask is 0 becomes IGNORE_INDEX and its
    mask 1, so the same targets are left out in another way. The two steps must agree, bitwise by
    default: the loss multiplies masked targets by an exact 0, and the token count must leave out
    the same targets. Run it with several accumulation counts: the relation holds for every k.

    What it catches: a token count (the normaliser N) that ignores the mask or IGNORE_INDEX, a
    loss that does, and masks lost when a batch is split into micro-batches.

    Args:
        step: ``step(state, batch) -> (state, metrics)``.
        state: the state to start from.
        batch: a NamedTuple with ``targets`` and ``mask`` fields whose mask is 0 on some target
            that is not IGNORE_INDEX (e.g. from ``testing.masked_batches``).
        rtol, atol: tolerances (0: bitwise).
    """
    mask, targets = getattr(batch, "mask", None), batch.targets
    if mask is None:
        raise ValueError("assert_mask_equivalent: the batch has no loss mask; give it one with zeros.")
    masked = (mask == 0) & (targets != IGNORE_INDEX)
    if not bool(masked.any()):
        raise ValueError("assert_mask_equivalent: the mask is 0 on no counted target, so there is nothing to compare; "
                         "give a batch whose mask is 0 where its target is not IGNORE_INDEX.")
    ignored = batch._replace(targets=torch.where(masked, torch.full_like(targets, IGNORE_INDEX), targets),
                             mask=torch.where(masked, torch.ones_like(mask), mask))
    new_m, met_m = _run(step, state, batch)
    new_i, met_i = _run(step, state, ignored)
    assert_trees_close(_metrics(met_m), _metrics(met_i), rtol=rtol, atol=atol, msg="mask 0 against IGNORE_INDEX: metric ")
    assert_trees_close(new_m, new_i, rtol=rtol, atol=atol, msg="mask 0 against IGNORE_INDEX: ")


def _round_to(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda x: x.to(dtype).to(x.dtype) if x.is_floating_point() else x, tree)


def assert_master_precision(make_step: Callable[[float], Callable], state: Any, batch: Any, *, lr: float,
                            compute_dtype: torch.dtype) -> None:
    """Assert that master params keep updates too small to change their compute-dtype copies.

    The params of ``state`` are first rounded to values that ``compute_dtype`` holds exactly, so
    the compute copy of every param is the master itself. Then ``make_step(lr)`` and
    ``make_step(2 * lr)`` each take one step from there. On the masters whose update at ``2 * lr``
    stays below half an ulp of the compute dtype (their compute copy does not change; there must
    be some, so ``lr`` must be small):

    - the masters move: some of them change at ``lr``;
    - in proportion to the learning rate: ``new(2 lr) - old == 2 (new(lr) - old)`` within the
      rounding of the masters' own dtype (4.5 ulps, see the code).

    A step that stores or rounds its masters in the compute dtype loses every such update, so
    nothing moves; one whose update is rounded to the compute dtype's resolution is not
    proportional. The step's update must be proportional to the learning rate, as SGD's and
    AdamW's are (decay included). Masters equal to 0 are left out (any update shows there).

    Args:
        make_step: ``lr -> step``, the same step for any learning rate.
        state: the state to start from; its params in a dtype wider than ``compute_dtype``.
        batch: a batch the step takes.
        lr: the small learning rate (e.g. 1e-7 for AdamW, whose update is about lr per element).
        compute_dtype: the dtype the step computes in (e.g. torch.bfloat16).
    """
    leaves = [x for x in tree_leaves(state.params) if x.is_floating_point()]
    if not leaves or torch.finfo(leaves[0].dtype).eps >= torch.finfo(compute_dtype).eps:
        raise ValueError(f"assert_master_precision: the params ({leaves[0].dtype if leaves else None}) must be wider "
                         f"than the compute dtype {compute_dtype}; this checks mixed-precision masters.")
    start = state._replace(params=_round_to(state.params, compute_dtype))
    (one, m1), (two, m2) = _run(make_step(lr), start, batch), _run(make_step(2 * lr), start, batch)
    _not_skipped(m1, f"lr {lr:g}")
    _not_skipped(m2, f"lr {2 * lr:g}")
    checked = moved = 0
    for old, a, b in zip(tree_leaves(start.params), tree_leaves(one.params), tree_leaves(two.params)):
        if not old.is_floating_point():
            continue
        # Where the 2 lr step leaves the compute copy unchanged, its update (and the lr one's) is
        # below half a compute ulp. A zero master has no such ulp (any update shows there): left out.
        live = (old != 0) & (b.to(compute_dtype) == old.to(compute_dtype))
        da, db = (a.double() - old.double())[live], (b.double() - old.double())[live]
        # Each run rounds old + update once (half an ulp) and may round a decay factor such as
        # 1 - lr * wd (one ulp): 1.5 ulps a run, so |db - 2 da| <= 1.5 + 2 * 1.5 = 4.5 ulps.
        ulp = torch.finfo(old.dtype).eps * old.double().abs()[live]
        if bool(((db - 2 * da).abs() > 4.5 * ulp).any()):
            worst = float(((db - 2 * da).abs() / ulp).max())
            raise AssertionError(f"master precision: a master moved {worst:.1f} ulps of {old.dtype} away from twice its "
                                 f"move at lr {lr:g} when stepped at {2 * lr:g}: below the compute dtype's resolution "
                                 "the update is not proportional to the learning rate")
        checked += int(live.sum())
        moved += int((da != 0).sum())
    if checked == 0:
        raise ValueError(f"assert_master_precision: at lr {2 * lr:g} every update is half a {compute_dtype} ulp or "
                         "more; lower lr so that some are below it.")
    if moved == 0:
        raise AssertionError(f"master precision: none of the {checked} masters whose updates at lr {lr:g} are below "
                             f"half a {compute_dtype} ulp moved: the masters lost those updates")
