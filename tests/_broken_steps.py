"""A hand-written training step, correct or with one realistic mixed-precision bug, for the kit's tests.

``make_user_step`` is the kind of step a user writes from the library's public pieces (the model's
loss, a precision policy, a loss scale, an optimizer); ``bug`` plants one mistake of a known class,
so each metamorphic assertion of ``functional_memopt.testing`` can be seen to catch its class and
to pass on the correct version of the same code:

- "clip_scaled_norm": clips by the norm of the *scaled* gradient;
- "no_unscale": never divides the loss scale back out;
- "double_unscale": divides it out twice;
- "mean_of_means": averages per-micro-batch mean losses instead of normalising by the batch's tokens;
- "count_ignores_mask": counts every target that is not IGNORE_INDEX, masked or not;
- "round_masters": rounds the master params to the compute dtype after each update;
- "round_grads": rounds the gradients to the compute dtype before the update.
"""

from __future__ import annotations

import torch

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt.train.step import make_loss_fn

BUGS = ("clip_scaled_norm", "no_unscale", "double_unscale", "mean_of_means", "count_ignores_mask", "round_masters",
        "round_grads")


def make_user_step(cfg, optimizer, *, policy="fp32", accum_steps=1, max_grad_norm=None, bug=None):
    """``step(state, batch) -> (state, metrics)`` on a TrainState, with ``bug`` planted (None: correct)."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}")
    pol = fm.get_policy(policy)
    loss_fn = fm.with_policy(make_loss_fn(cfg), pol)

    def count(batch):
        mask = None if bug == "count_ignores_mask" else batch.mask
        return (batch.targets != fm.IGNORE_INDEX).double().mul(1.0 if mask is None else mask.double()).sum()

    def step(state, batch):
        ls = state.loss_scale
        scale = ls.loss_scale.double()
        total = count(batch).clamp(min=1.0)
        micro = fm.split_microbatches(batch, accum_steps)

        def scaled(params, mb):
            loss_sum, n = loss_fn(params, mb)
            if bug == "mean_of_means":
                factor = scale / (n.double().clamp(min=1.0) * len(micro))
            else:
                factor = scale / total
            return loss_sum * factor.to(loss_sum.dtype), (loss_sum.detach(), n.detach())

        acc = fm.accumulate_gradients(fm.value_and_grad(scaled, has_aux=True), state.params, micro)
        grads = acc.grads
        if bug != "no_unscale":
            grads = ls.unscale(grads)
        if bug == "double_unscale":
            grads = ls.unscale(grads)
        norm = fmtree.tree_global_norm(grads)
        finite = torch.isfinite(norm)
        metrics = {"loss": acc.loss_sum / acc.count.clamp(min=1.0), "grad_norm": norm, "skipped": ~finite,
                   "tokens": acc.count}
        if not bool(finite):
            return state._replace(loss_scale=ls.adjust(finite)), metrics
        if max_grad_norm is not None:
            clip_norm = norm * scale if bug == "clip_scaled_norm" else norm
            coef = torch.clamp(max_grad_norm / (clip_norm + 1e-6), max=1.0)
            grads = fmtree.tree_map(lambda g: g * coef.to(g.dtype), grads)
        if bug == "round_grads":
            grads = pol.cast_to_compute(grads)
        grads = pol.cast_to_param(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = fm.apply_updates(state.params, updates)
        if bug == "round_masters":
            params = pol.cast_to_param(pol.cast_to_compute(params))
        return fm.TrainState(state.step + 1, params, opt_state, ls.adjust(finite)), metrics

    return step
