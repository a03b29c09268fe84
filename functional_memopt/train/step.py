"""The composed training step: precision policy, loss scaling, accumulation, clipping, optimizer.

``make_train_step`` returns one pure function ``step(state, batch) -> (state, metrics)``. As the
code runs it, with S the loss scale and N the tokens counted in the whole batch (all ranks)::

    N = parallel.count(token_count(batch))                 # known before the fold
    batch --split--> k micro-batches; for each (one micro-batch's activations alive at a time):
        value_and_grad of loss_sum * S / N under the policy   # autograd engine by default
        fold: float32 accumulator += grads; loss sums and counts summed
            (chunked head under just-in-time casts: its gradient * S / N goes into the
            accumulator in the forward, through a HeadGradSink)
    acc = parallel.reduce(acc)                              # data parallel: one bucketed collective
    grads = acc / S, in place (exact for a power-of-two S)
    finite, norm = parallel.summarize(grads)               # one pass: global norm and finite check
    not finite -> state unchanged but the loss scale       # one host sync, as GradScaler.step makes
    clip by the unscaled norm; parallel.update (update_and_apply: AdamW's fused kernel steps the
        params, in place when donated); loss scale adjusts

The default engine is ``torch.autograd.grad`` over the pure loss; ``torch.func`` keeps every saved
tensor alive until its backward ends (1.7x the peak), so it is an opt-in (``engine="func"``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from ..data.batch import Batch, check_batch, split_microbatches, token_count
from ..model.config import ModelConfig
from ..model.cce_loss import CCE, check_cce
from ..model.chunked_loss import HeadGradSink
from ..model.gpt import loss_fn as model_loss_fn
from ..model.remat import RematSpec
from ..optim.base import GradientTransformation
from ..optim.clip import clip_leaves
from .accumulate import accumulate_gradients, accumulate_in_place, accumulator_dtype
from .compile import compile_loss, compile_options
from .grad import DEFAULT_ENGINE, value_and_grad
from .guard import NonFiniteUpdateError, nonfinite_leaves
from .loss_scale import LossScale, NoOpLossScale
from .parallelism import Parallelism, single_process
from .precision import Policy, get_policy, with_policy

__all__ = ["TrainState", "init_train_state", "make_train_step", "make_loss_fn"]


class TrainState(NamedTuple):
    """Everything a training step reads and writes."""

    step: torch.Tensor  # () int64: optimizer updates applied (skipped steps do not count)
    params: Any  # pytree of master params (float32 under a mixed policy)
    opt_state: Any  # the optimizer's state pytree (this rank's shard under ZeRO)
    loss_scale: LossScale  # NoOp / Static / Dynamic loss-scale state


def init_train_state(
    params: Any,
    optimizer: GradientTransformation,
    *,
    loss_scale: LossScale | None = None,
    policy: Policy | str | None = None,
    parallel: Parallelism | None = None,
) -> TrainState:
    """A fresh TrainState; params are cast to the policy's param dtype first.

    Args:
        params: the model's params.
        optimizer: the GradientTransformation the step will use.
        loss_scale: a loss-scale state (default: none).
        policy: the precision policy; its param dtype is the dtype of the master params.
        parallel: the step's Parallelism (e.g. ``data_parallel(zero_stage=1)``): rank 0's params
            are copied to every rank and the optimizer state is this rank's part only.

    Example:
        >>> from functional_memopt import init_params, ModelConfig, adamw
        >>> state = init_train_state(init_params(ModelConfig(n_layer=1)), adamw(1e-3))
        >>> int(state.step)
        0
    """
    if policy is not None:
        params = get_policy(policy).cast_to_param(params)
    params, opt_state = (parallel or single_process()).init(params, optimizer)
    leaves = optree.tree_leaves(params)
    device = leaves[0].device if leaves else None
    return TrainState(
        step=torch.zeros((), dtype=torch.int64, device=device),
        params=params,
        opt_state=opt_state,
        loss_scale=loss_scale if loss_scale is not None else NoOpLossScale(),
    )


def make_loss_fn(cfg: ModelConfig, *, remat: RematSpec = None, loss_chunk: int | str | None = None,
                 compute_dtype: torch.dtype | None = None, check: bool = False) -> Callable:
    """The model's ``loss(params, batch) -> (loss_sum, count)`` for a Batch.

    Args:
        cfg: the model config.
        remat: blocks to rematerialise (see remat_layers).
        loss_chunk: tokens per chunk of the head and cross-entropy (None: the whole logits;
            "cce": cut-cross-entropy's kernels).
        compute_dtype: cast each block's params to this dtype just in time (None: no cast).
        check: validate tokens and params on every call (a host sync; off inside the step).
    """

    def loss(params, batch: Batch, head_grad: HeadGradSink | None = None):
        return model_loss_fn(params, batch.tokens, batch.targets, cfg, mask=batch.mask,
                             attention_mask=batch.attention_mask, segment_ids=batch.segment_ids, remat=remat,
                             compute_dtype=compute_dtype, loss_chunk=loss_chunk, head_grad=head_grad, check=check)

    return loss


def _head_sink(params, factor) -> HeadGradSink:
    """The in-place fold's sum for the master wte (made here on the first micro-batch, unfilled:
    the chunked loss writes its first chunk over it)."""
    wte = params["wte"]
    fresh = wte.grad is None
    if fresh:
        wte.grad = torch.empty_like(wte)
    return HeadGradSink(wte.grad, factor, fresh=fresh)


def make_train_step(
    cfg: ModelConfig | None,
    optimizer: GradientTransformation,
    *,
    policy: Policy | str = "fp32",
    accum_steps: int = 1,
    remat: RematSpec = None,
    max_grad_norm: float | None = None,
    loss_chunk: int | str | None = None,
    loss_fn: Callable | None = None,
    count_fn: Callable | None = None,
    donate: bool = False,
    engine: str = DEFAULT_ENGINE,
    policy_mode: str = "cast",
    parallel: Parallelism | None = None,
    compile: bool | dict = False,
    validate_batch: bool = True,
    guard_updates: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Compose the techniques into one pure ``step(state, batch) -> (state, metrics)``.

    Args:
        cfg: model config (used for the default loss; may be None with a custom ``loss_fn``).
        optimizer: a GradientTransformation (e.g. ``adamw(3e-4)``).
        policy: precision policy or its string ("fp32", "mixed_bf16", "mixed_fp16", ...).
        accum_steps: micro-batches per step; the batch's rows are split into this many.
        remat: which blocks to rematerialise (None, "all", every n-th as an int, or indices).
        max_grad_norm: clip the global gradient norm to this (None: no clipping). Under data
            parallel this is the norm of the global gradient; clip here rather than with
            ``clip_by_global_norm`` inside the optimizer, which would see one shard under ZeRO.
        loss_chunk: tokens per chunk of the model's head and cross-entropy, so the (b, T, V)
            logits of a micro-batch are never materialised (None: computed whole). The ledger
            chooses one (``memopt train --loss-chunk auto``). "cce" runs the head and loss in the
            optional cut-cross-entropy package's fused CUDA kernels instead (a half compute dtype,
            the autograd engine, not compiled; see ``model.cce_loss``).
        loss_fn: ``loss_fn(params, batch) -> (loss_sum, count)``; the model's by default. A custom
            batch type needs a ``split_microbatches``-compatible NamedTuple of (B, ...) tensors.
        count_fn: ``count_fn(batch) -> tokens`` that ``loss_fn`` counts in the whole batch (default
            ``token_count``). Knowing the total before the fold lets each micro-batch
            differentiate ``loss_sum * S / N``: per-token gradients then carry the same scale as
            GradScaler's mean loss, so fp16 overflows exactly when the imperative recipe does.
        donate: update params and optimizer state in place. The caller gives up the state passed
            in (it must not be used again). Off by default: the step is pure and the old state
            stays valid, at the cost of one more copy of params and optimizer state at peak.
        engine: gradient engine, "autograd" (default, for memory: see ``train.grad``) or "func".
        policy_mode: "cast" (explicit casts, the default) or "autocast".
        parallel: how the step spreads over ranks (``data_parallel(...)``); None for one process.
            With it, each rank passes its own rows of the global batch (``shard_batch``) and
            ``accum_steps`` counts this rank's micro-batches.
        compile: compile the differentiated loss (the policy-wrapped ``loss_sum * factor``) with
            ``torch.compile``, so AOTAutograd compiles its forward and backward together, while
            ``torch.autograd``, the fold, the skip decision and the optimizer stay eager. True uses
            ``train.compile.COMPILE_DEFAULTS``; a dict is passed to ``torch.compile`` over them.
            Needs ``engine="autograd"``. The loss scale and token count reach the compiled graph
            as one tensor, so neither a changing loss scale nor the step count recompiles it.
        validate_batch: check each Batch once per step (dtypes, (B, T) shapes of every field, T
            against the block size, ids against the vocabulary: one host sync), so a bad batch is
            a ValueError / TypeError naming the field instead of an IndexError deep in the model.
        guard_updates: check the new params and optimizer state for inf and nan after every
            update (one pass, one host sync). Without ``donate`` such an update is skipped like an
            overflow step (``metrics["nonfinite_update"]``); a donated state was overwritten in
            place and cannot be kept, so the step raises NonFiniteUpdateError naming the leaves.

    Returns:
        ``step(state, batch)``. Metrics (0-d tensors): loss (per counted token), grad_norm (of the
        unscaled, unclipped gradient; inf/nan on overflow), loss_scale (used in this step),
        skipped (bool), nonfinite_update (bool: finite gradients, but the update was not finite,
        so it was skipped), tokens (counted tokens). Under data parallel they are global and equal
        on every rank.

    A step whose gradients are not finite changes nothing but the loss scale: params, optimizer
    state (its count and so the schedule position) and ``step`` come back as the same tensors.
    """
    pol = get_policy(policy)
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"make_train_step: accum_steps must be an int >= 1, got {accum_steps!r}.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"make_train_step: max_grad_norm must be > 0 or None, got {max_grad_norm!r}.")
    if parallel is not None and not isinstance(parallel, Parallelism):
        raise TypeError(f"make_train_step: parallel must be a Parallelism (e.g. data_parallel()) or None, "
                        f"got {type(parallel).__name__}.")
    # Just-in-time casts pay under a mixed policy; with one dtype the policy's single cast at entry
    # (a no-op for params already in it) saves a tree walk per block and micro-batch.
    own_loss = loss_fn is None  # the model's own loss (a custom loss_fn is opaque to the step)
    jit_cast = own_loss and policy_mode == "cast" and pol.compute_dtype != pol.param_dtype
    if loss_fn is None:
        if cfg is None:
            raise ValueError("make_train_step: pass a ModelConfig or a loss_fn.")
        # Under the cast policy the model casts each block's params just in time (bit-identical
        # gradients, one block's compute copy alive at a time instead of the whole model's).
        loss_fn = make_loss_fn(cfg, remat=remat, loss_chunk=loss_chunk,
                               compute_dtype=pol.compute_dtype if jit_cast else None)
    elif loss_chunk is not None:
        raise ValueError("make_train_step: loss_chunk applies to the model's own loss; a custom loss_fn chunks "
                         "its own head (see chunked_token_loss).")
    policed = with_policy(loss_fn, pol, mode=policy_mode, cast_params=not jit_cast)
    count_tokens = count_fn or token_count
    par = parallel or single_process()

    def scaled_loss(params, batch, factor, *sink):
        loss_sum, count = policed(params, batch, *sink)
        return loss_sum * factor.reshape(()).to(loss_sum.dtype), (loss_sum.detach(), count.detach())

    options = compile_options(compile)
    if loss_chunk == CCE:
        if policy_mode != "cast":
            raise ValueError(f"make_train_step: loss_chunk='cce' needs policy_mode='cast' (the kernels take the head "
                             f"and features in one half dtype), got {policy_mode!r}.")
        check_cce("make_train_step", engine=engine, compiled=options is not None, compute_dtype=pol.compute_dtype)
    if options is not None:
        if engine != "autograd":
            raise ValueError(f"make_train_step: compile= compiles the loss for engine='autograd', got engine={engine!r}; "
                             "use engine='autograd' (autograd stays eager around the compiled loss).")
        scaled_loss = compile_loss(scaled_loss, options)
    grad_fn = value_and_grad(scaled_loss, has_aux=True, engine=engine)
    # The chunked head adds its gradient straight into the in-place fold's float32 sum for wte, in
    # the forward (model/chunked_loss.py): no (V, C) head gradient in any dtype, which at GPT-2's
    # shape is the largest item above the optimizer-state floor. Under the cast policy only (just in
    # time, or one dtype): the model then holds the fold's own leaves. The compiled loss keeps
    # autograd's route (a traced graph does not write into a buffer outside it).
    direct_head = (own_loss and policy_mode == "cast" and isinstance(loss_chunk, int) and options is None
                   and engine == "autograd" and (jit_cast or pol.compute_dtype == pol.param_dtype))

    def fold(params, micro, factor):
        # The autograd engine adds each micro-batch's gradients into the sums as they are made
        # (no gradient tree beside the accumulator); half-precision masters keep the general fold,
        # whose float32 accumulator they need.
        wide = all(accumulator_dtype(x.dtype) == x.dtype for x in optree.tree_leaves(params) if x.is_floating_point())
        if engine == "autograd" and wide:
            if direct_head:
                return accumulate_in_place(lambda p, mb: scaled_loss(p, mb, factor, _head_sink(p, factor)),
                                           params, micro)
            return accumulate_in_place(lambda p, mb: scaled_loss(p, mb, factor), params, micro)
        return accumulate_gradients(lambda p, mb: grad_fn(p, mb, factor), params, micro)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        if validate_batch and (cfg is not None or isinstance(batch, Batch)):
            check_batch(batch, vocab_size=getattr(cfg, "vocab_size", None), block_size=getattr(cfg, "block_size", None),
                        caller="train step")
        ls = state.loss_scale
        scale = None if isinstance(ls, NoOpLossScale) else ls.loss_scale
        total = par.count(torch.as_tensor(count_tokens(batch), dtype=torch.float64)).clamp(min=1.0)
        # Each micro-batch differentiates loss_sum * S / N_total: the fold then sums to S times the
        # full-batch mean-loss gradient, whatever the micro-batches' token counts.
        factor = (1.0 / total) if scale is None else scale.to(torch.float64) / total
        # Shape (1,), not (): dynamo takes a 0-d float64 CPU tensor input for a traced Python float
        # (it re-traces once and guards `not isnan(factor.item())`, so a nan factor would recompile).
        factor = factor.reshape(1)
        micro = split_microbatches(batch, accum_steps) if accum_steps > 1 else [batch]
        # Reduced before unscaling, as the single-process fold sums scaled gradients too.
        acc = par.reduce(fold(state.params, micro, factor))
        # The accumulator is the step's own, so it is unscaled in place; 1 / S is exact for a
        # power-of-two S, so this undoes the scaling bit for bit.
        grads = ls.unscale(acc.grads, donate=True)
        finite, grad_norm, loss_sum, count = par.summarize(grads, acc.loss_sum, acc.count)
        metrics = {
            "loss": loss_sum / count.clamp(min=1.0),
            "grad_norm": grad_norm,
            "loss_scale": ls.loss_scale.detach().clone(),
            "skipped": ~finite,
            "nonfinite_update": torch.zeros((), dtype=torch.bool, device=finite.device),
            "tokens": count,
        }
        if not bool(finite):  # one host sync per step, as GradScaler.step makes
            return state._replace(loss_scale=ls.adjust(finite)), metrics
        if max_grad_norm is not None:  # by the unscaled norm, on the step's own accumulator
            clip_leaves(optree.tree_leaves(grads), grad_norm, max_grad_norm, inplace=True)
        grads = pol.cast_to_param(grads)
        params, opt_state = par.update(optimizer, grads, state, donate=donate)
        if guard_updates:
            bad = nonfinite_leaves(params, opt_state)
            if par.world_size > 1 and par.zero_stage > 0:  # each rank checked its own optimizer shard
                any_bad = par.count(torch.tensor(float(len(bad)), dtype=torch.float64, device=finite.device)) > 0
                bad = bad or (["opt_state (another rank's shard)"] if bool(any_bad) else [])
            if bad:
                n = int(state.step) + 1
                if donate:
                    raise NonFiniteUpdateError(
                        f"train step: update {n} wrote inf or nan into {bad[:6]} from finite gradients (a learning "
                        "rate far too large, or a damaged optimizer state); the state was donated, so it is now "
                        "unusable. Reload the last checkpoint and lower the learning rate, or build the step with "
                        "donate=False to skip such updates.", leaves=bad, step=n)
                yes = torch.ones((), dtype=torch.bool, device=finite.device)
                skip = {**metrics, "skipped": yes, "nonfinite_update": yes}
                return state._replace(loss_scale=ls.adjust(torch.zeros_like(finite))), skip
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=ls.adjust(finite))
        return new, metrics

    return step
