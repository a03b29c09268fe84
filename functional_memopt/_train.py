"""The composed training step: precision policy, loss scaling, accumulation, clipping, optimizer.

``make_train_step`` returns one pure function ``step(state, batch) -> (state, metrics)``::

    batch --split--> k micro-batches
      fold: grads(loss_sum * S) under the policy, summed into a float32 accumulator
    grads = acc / (S * total tokens)      # one multiply; exact in S for a power-of-two S
    finite = all_finite(grads); clip; optimizer update
    state' = updated if finite else state (only the loss scale moves)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from ._accumulate import accumulate_gradients
from ._config import ModelConfig
from ._data import Batch, split_microbatches
from ._grad import value_and_grad
from ._loss_scale import LossScale, NoOpLossScale
from ._model import IGNORE_INDEX
from ._model import loss_fn as model_loss_fn
from ._optim import GradientTransformation, apply_updates
from ._precision import Policy, get_policy, with_policy
from ._remat import RematSpec
from ._tree import tree_global_norm

__all__ = [
    "TrainState",
    "init_train_state",
    "make_train_step",
    "make_loss_fn",
    "batch_token_count",
    "summarize_gradients",
    "update_params",
]


class TrainState(NamedTuple):
    """Everything a training step reads and writes."""

    step: torch.Tensor  # () int64: optimizer updates applied (skipped steps do not count)
    params: Any  # pytree of master params (float32 under a mixed policy)
    opt_state: Any  # the optimizer's state pytree
    loss_scale: LossScale  # NoOp / Static / Dynamic loss-scale state


def init_train_state(
    params: Any,
    optimizer: GradientTransformation,
    *,
    loss_scale: LossScale | None = None,
    policy: Policy | str | None = None,
) -> TrainState:
    """A fresh TrainState; params are cast to the policy's param dtype first.

    Example:
        >>> from functional_memopt import init_params, ModelConfig, adamw
        >>> state = init_train_state(init_params(ModelConfig(n_layer=1)), adamw(1e-3))
        >>> int(state.step)
        0
    """
    if policy is not None:
        params = get_policy(policy).cast_to_param(params)
    leaves = optree.tree_leaves(params)
    device = leaves[0].device if leaves else None
    return TrainState(
        step=torch.zeros((), dtype=torch.int64, device=device),
        params=params,
        opt_state=optimizer.init(params),
        loss_scale=loss_scale if loss_scale is not None else NoOpLossScale(),
    )


def make_loss_fn(cfg: ModelConfig, *, remat: RematSpec = None, check: bool = False) -> Callable:
    """The model's ``loss(params, batch) -> (loss_sum, count)`` for a Batch.

    Args:
        cfg: the model config.
        remat: blocks to rematerialise (see remat_layers).
        check: validate tokens and params on every call (a host sync; off inside the step).
    """

    def loss(params, batch: Batch):
        return model_loss_fn(
            params,
            batch.tokens,
            batch.targets,
            cfg,
            mask=batch.mask,
            attention_mask=batch.attention_mask,
            segment_ids=batch.segment_ids,
            remat=remat,
            check=check,
        )

    return loss


def batch_token_count(batch) -> torch.Tensor:
    """Tokens the model's loss counts in ``batch``: targets not IGNORE_INDEX, weighted by mask.

    Works for any object with ``targets`` and an optional ``mask`` field (e.g. :class:`Batch`).
    """
    targets = getattr(batch, "targets", None)
    if targets is None:
        raise TypeError(
            "batch_token_count: the batch has no `targets` field; pass count_fn= to make_train_step "
            "returning the number of tokens your loss_fn counts in a batch."
        )
    weight = (targets != IGNORE_INDEX).to(torch.float64)
    mask = getattr(batch, "mask", None)
    if mask is not None:
        weight = weight * mask.to(torch.float64)
    return weight.sum()


def _no_reduction(value):
    return value


def summarize_gradients(grads, loss_sum: torch.Tensor, count: torch.Tensor) -> tuple:
    """``(finite, global_norm(grads), loss_sum, count)``: the single-process summary.

    The norm is finite exactly when every gradient element is finite (inf and nan propagate
    through the sum of squares), so one pass over the gradients gives both; a norm that overflows
    float32 (above ~3e38) also counts as non-finite, and that step is skipped too.
    """
    norm = tree_global_norm(grads)
    return torch.isfinite(norm), norm, loss_sum, count


def update_params(optimizer: GradientTransformation, grads, state: TrainState, *, donate: bool = False) -> tuple:
    """``(params, opt_state)`` after one optimizer update: the single-process update."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, donate=donate)
    return apply_updates(state.params, updates, donate=donate), opt_state


def make_train_step(
    cfg: ModelConfig | None,
    optimizer: GradientTransformation,
    *,
    policy: Policy | str = "fp32",
    accum_steps: int = 1,
    remat: RematSpec = None,
    max_grad_norm: float | None = None,
    loss_fn: Callable | None = None,
    count_fn: Callable | None = None,
    donate: bool = False,
    engine: str = "autograd",
    policy_mode: str = "cast",
    parallel: Any = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Compose the techniques into one pure ``step(state, batch) -> (state, metrics)``.

    Args:
        cfg: model config (used for the default loss; may be None with a custom ``loss_fn``).
        optimizer: a GradientTransformation (e.g. ``adamw(3e-4)``).
        policy: precision policy or its string ("fp32", "mixed_bf16", "mixed_fp16", ...).
        accum_steps: micro-batches per step; the batch's rows are split into this many.
        remat: which blocks to rematerialise (None, "all", every n-th as an int, or indices).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        loss_fn: ``loss_fn(params, batch) -> (loss_sum, count)``; the model's by default. A custom
            batch type needs a ``split_microbatches``-compatible NamedTuple of (B, ...) tensors.
        count_fn: ``count_fn(batch) -> tokens`` that ``loss_fn`` counts in the whole batch (default
            :func:`batch_token_count`). Knowing the total before the fold lets each micro-batch
            differentiate ``loss_sum * S / N``: per-token gradients then carry the same scale as
            GradScaler's mean loss, so fp16 overflows exactly when the imperative recipe does.
        donate: update params and optimizer state in place. The caller gives up the state passed
            in (it must not be used again). Off by default: the step is pure and the old state
            stays valid, at the cost of one more copy of params and optimizer state at peak.
        engine: gradient engine, "autograd" (default: measured faster on the CPU) or "func".
        policy_mode: "cast" (explicit casts, the default) or "autocast".
        parallel: how the step spreads over ranks (a ``Parallelism``, e.g. ``data_parallel()``);
            None for one process. Its hooks give the global token count, reduce the fold's sums,
            summarize the reduced gradients and apply the update (see ``_distributed.Parallelism``).

    Returns:
        ``step(state, batch)``. Metrics (0-d tensors): loss (per counted token), grad_norm (of the
        unscaled, unclipped gradient; inf/nan on overflow), loss_scale (used in this step),
        skipped (bool), tokens (counted tokens).

    A step whose gradients are not finite changes nothing but the loss scale: params, optimizer
    state (its count and so the schedule position) and ``step`` come back as the same tensors.
    """
    pol = get_policy(policy)
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"make_train_step: accum_steps must be an int >= 1, got {accum_steps!r}.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"make_train_step: max_grad_norm must be > 0 or None, got {max_grad_norm!r}.")
    if loss_fn is None:
        if cfg is None:
            raise ValueError("make_train_step: pass a ModelConfig or a loss_fn.")
        loss_fn = make_loss_fn(cfg, remat=remat)
    policed = with_policy(loss_fn, pol, mode=policy_mode)

    count_tokens = count_fn or batch_token_count
    if parallel is None:
        global_count, reduce, summarize, update = _no_reduction, _no_reduction, summarize_gradients, update_params
    else:
        global_count, reduce, summarize, update = parallel.count, parallel.reduce, parallel.summarize, parallel.update

    def scaled_loss(params, batch, factor):
        loss_sum, count = policed(params, batch)
        return loss_sum * factor.to(loss_sum.dtype), (loss_sum.detach(), count.detach())

    grad_fn = value_and_grad(scaled_loss, has_aux=True, engine=engine)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        ls = state.loss_scale
        scale = None if isinstance(ls, NoOpLossScale) else ls.loss_scale
        # The global count (over all ranks) is known before the fold, so each rank's micro-batches
        # differentiate loss_sum * S / N_total and the reduced fold is the global-batch gradient.
        total = global_count(torch.as_tensor(count_tokens(batch), dtype=torch.float64)).clamp(min=1.0)
        # Each micro-batch differentiates loss_sum * S / N_total: the fold then sums to S times the
        # full-batch mean-loss gradient, whatever the micro-batches' token counts.
        factor = (1.0 / total) if scale is None else scale.to(torch.float64) / total
        micro = split_microbatches(batch, accum_steps) if accum_steps > 1 else [batch]
        # Reduced before unscaling, as the single-process fold sums scaled gradients too.
        acc = reduce(accumulate_gradients(lambda p, mb: grad_fn(p, mb, factor), state.params, micro))
        # The accumulator is the step's own, so it is unscaled in place; 1 / S is exact for a
        # power-of-two S, so this undoes the scaling bit for bit.
        grads = ls.unscale(acc.grads, donate=True)
        # Global values: every rank takes the same skip / loss-scale decision.
        finite, grad_norm, loss_sum, count = summarize(grads, acc.loss_sum, acc.count)
        metrics = {
            "loss": loss_sum / count.clamp(min=1.0),
            "grad_norm": grad_norm,
            "loss_scale": ls.loss_scale.detach().clone(),
            "skipped": ~finite,
            "tokens": count,
        }
        if not bool(finite):  # one host sync per step, as GradScaler.step makes
            return state._replace(loss_scale=ls.adjust(finite)), metrics
        if max_grad_norm is not None:
            coef = torch.clamp(max_grad_norm / (grad_norm + 1e-6), max=1.0)
            leaves = optree.tree_leaves(grads)  # the step's own: clipped in place
            torch._foreach_mul_(leaves, [coef.to(g.dtype) for g in leaves])
        grads = pol.cast_to_param(grads)
        params, opt_state = update(optimizer, grads, state, donate=donate)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=ls.adjust(finite))
        return new, metrics

    return step
