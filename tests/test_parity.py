"""The composed functional step against the imperative recipe, step for step (invariant 12).

The recipe (functional_memopt/testing/reference.py) is what a PyTorch user writes: an nn.Module,
torch.autocast, torch.amp.GradScaler, the summed token loss over the step's token count,
unscale_, clip_grad_norm_ and torch.optim. It shares no code with the step. Each property draws a
config, ragged batches with padding and loss masks, the micro-batch count, clipping, the
optimizer and the precision route, runs both for three steps and compares the loss, the gradient
norm, the skip decisions and loss scales, and the params (SGD) or AdamW's first moment at every
step.

Tolerances, in units of epsilon (see testing/tolerances.py for the factors):

- Where both runs do the same arithmetic on the same values (every fp32 step; the first step in
  autocast mode, where both lower the same ops, when the model's attention is SDPA as the
  recipe's is: ``attention="auto"`` takes the math kernel for short bf16 rows on the CPU), they
  differ only in the order of float32 sums: the loss by at most (n - 1) eps32 for n tokens (the
  worst case of summing n positive terms in two orders), the gradient norm by the same bound over
  its numel squares, and the gradients by 2 * GRAD_TOLERANCE_FACTOR * eps32 (each within the
  factor of the exact gradient).
- Otherwise (cast mode lowers every op, not autocast's list; later autocast steps start from
  params that differ in the last float32 bit, which can round to another half-precision value),
  each run is within GRAD_TOLERANCE_FACTOR (LOSS_TOLERANCE_FACTOR) epsilons of the compute dtype
  of the float32 result, so the two are within twice that of each other.
- Params under SGD move by lr times the gradient history, so their error is bounded by the same
  sum over the history of the gradient bound times the gradient's norm, plus one float32 rounding
  of the params a step, and doubled for the second-order effect of the params' own difference on
  later gradients (tests/_bounds.py).
- From the second SGD step on, the two runs compute their gradients at params that already
  differ, so the exact gradients differ too, by an amount no epsilon bound knows (it is the
  Hessian times the params' difference). It is measured: the recipe's module in float64 gives the
  exact gradient at both runs' params, and the distance between the two (and between their norms)
  joins the rounding bound of the gradient, its norm and the update.
- Adam divides each element by its own magnitude, so rounding noise on an element whose true
  gradient is (near) zero becomes a full +-lr step of either sign. For AdamW the first moment
  (the gradient, linear) is compared instead of the params, at the first applied step; after it
  the runs stand at params that differ by O(lr), not by rounding, and only the skip decisions and
  the loss scale are compared (seen under the thorough profile: a 2% gradient-norm difference at
  step 2 in cast mode). test_optim.py holds the AdamW update itself against torch's, and the SGD
  runs hold the params at every step.
"""

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import testing
from functional_memopt.testing.reference import ImperativeTrainer, ReferenceGPT
from functional_memopt.train.step import init_train_state, make_train_step

from _bounds import FirstMomentBound, MomentumBound, l2, l2_difference
from _hypothesis import examples

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
STEPS = 3
LR = {"sgd": 0.05, "adamw": 1e-3}
BETA1 = 0.9
POLICY = {"fp32": "fp32", "bf16": "mixed_bf16", "fp16": "mixed_fp16"}
COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Relative errors need gradients that are not mostly cancellation (testing/tolerances.py).
precise_configs = testing.configs(max_layer=2, max_head=2, min_head_dim=4, max_head_dim=6, max_block=8,
                                  vocab_size=None).filter(lambda c: c.vocab_size >= 16)


def _setup(data, cfg, precision, mode, opt_name):
    """Both sides built from the same draws: (trainer, step, state, batches, settings)."""
    B = data.draw(st.integers(1, 4), label="rows")
    batches = [data.draw(testing.masked_batches(cfg, min_rows=B, max_rows=B), label=f"batch {i}") for i in range(STEPS)]
    k = data.draw(st.integers(1, B), label="micro-batches")
    clip = data.draw(st.sampled_from([None, 0.05]), label="max_grad_norm")
    momentum = data.draw(st.sampled_from([0.0, 0.9]), label="momentum") if opt_name == "sgd" else 0.0
    if precision == "fp16" and mode == "autocast":
        # Same lowered ops as the recipe, so overflow happens in the same places: large scales make
        # the skips, backoffs and growth of GradScaler happen, and they must match exactly.
        init_scale = data.draw(testing.powers_of_two(8, 24), label="initial scale")
        growth = data.draw(st.integers(1, 3), label="growth interval")
    else:
        # Cast mode lowers more ops than autocast, so it overflows elsewhere: a scale that cannot
        # overflow (the head's gradient is at most S * sqrt(n_embd) <= 2**10 * 5) and no growth.
        init_scale, growth = 2.0**10, 10_000
    params = fm.init_params(cfg, seed=data.draw(st.integers(0, 2**16), label="seed"))
    trainer = ImperativeTrainer(ReferenceGPT.from_params(params, cfg), optimizer=opt_name, lr=LR[opt_name],
                                momentum=momentum, weight_decay=0.01, precision=precision, accum_steps=k,
                                max_grad_norm=clip, init_scale=init_scale, growth_interval=growth)
    opt = (fm.sgd(LR["sgd"], momentum=momentum, weight_decay=0.01) if opt_name == "sgd"
           else fm.adamw(LR["adamw"], weight_decay=0.01))
    step = make_train_step(cfg, opt, policy=POLICY[precision], policy_mode=mode, accum_steps=k, max_grad_norm=clip)
    ls = (fm.dynamic_loss_scale(init_scale, growth_interval=growth, min_loss_scale=0.0) if precision == "fp16"
          else None)
    state = init_train_state(params, opt, loss_scale=ls)
    return trainer, step, state, batches, dict(clip=clip, momentum=momentum)


def _check_against_the_recipe(cfg, data, precision, mode, opt_name):
    trainer, step, state, batches, hp = _setup(data, cfg, precision, mode, opt_name)
    numel = sum(x.numel() for x in optree.tree_leaves(state.params))
    eps_c = torch.finfo(COMPUTE[precision]).eps
    applied = 0
    bound = MomentumBound(LR["sgd"], hp["momentum"]) if opt_name == "sgd" else FirstMomentBound(BETA1)
    for t, batch in enumerate(batches):
        # (ours, the recipe's) params where they already differ (SGD after an applied step), else None.
        before = (state.params, trainer.model.params()) if opt_name == "sgd" and applied > 0 else None
        ref = trainer.step(batch.tokens, batch.targets, batch.mask, batch.attention_mask)
        state, m = step(state, batch)
        where = f"step {t + 1} ({precision}, {mode}, {opt_name}, {hp}): "
        assert float(m["tokens"]) == ref["tokens"], where + "tokens"
        assert bool(m["skipped"]) == ref["skipped"], where + "skip decision"
        assert float(m["loss_scale"]) == ref["loss_scale"], where + "loss scale used"
        if opt_name == "adamw" and applied > 0:
            # After one AdamW step the two runs stand at params that differ by up to +-lr per element
            # (Adam's sign of a near-zero gradient whose rounding differs), so what they compute
            # next is no longer a rounding difference of one computation: only the skip decisions
            # and the scale are held from here on.
            applied += 0 if ref["skipped"] else 1
            continue
        # The recipe's attention is SDPA; "auto" picks the math kernel for short bf16 rows on the CPU,
        # whose arithmetic differs (the compute-dtype bound below holds it then).
        kernel = fm.attention_kernel(cfg.attention, batch.tokens.shape[1], cfg.head_dim, COMPUTE[precision], "cpu")
        same_arithmetic = precision == "fp32" or (mode == "autocast" and t == 0 and kernel == "sdpa")
        eps = EPS32 if same_arithmetic else eps_c
        n = ref["tokens"]
        # The loss: summed over n tokens in two orders, and within the loss factor of float32.
        loss_tol = 2 * testing.LOSS_TOLERANCE_FACTOR * eps + max(n - 1, 0) * EPS32
        assert abs(float(m["loss"]) - ref["loss"]) <= loss_tol * abs(ref["loss"]) + EPS32, (
            where + f"loss {float(m['loss'])!r} against the recipe's {ref['loss']!r}")
        if ref["skipped"]:
            continue
        ref_norm = ref["grad_norm"]
        # The exact gradients' difference, relative to the recipe's norm: 0 while the params agree.
        drift, norm_drift = (0.0, 0.0) if before is None else (
            (d / max(ref_norm, 1e-30) for d in _exact_gradient_drift(cfg, before, batch)))
        rho = 2 * testing.GRAD_TOLERANCE_FACTOR * eps  # the gradients' relative L2 error bound
        norm_tol = rho + numel * EPS32 / 2 + norm_drift  # and the norm's: two float32 sums of numel squares
        assert abs(float(m["grad_norm"]) - ref_norm) <= norm_tol * ref_norm, (
            where + f"grad norm {float(m['grad_norm'])!r} against the recipe's {ref_norm!r}"
            f" (exact norms at the two runs' params differ by {norm_drift:.2%})")
        coef = 1.0 if hp["clip"] is None else min(1.0, hp["clip"] / (ref_norm + 1e-6))
        # Clipping multiplies by a coefficient computed from the norm: its error joins the gradient's.
        rho_update = rho + drift + (norm_tol if coef < 1.0 else 0.0)
        g = coef * ref_norm
        if opt_name == "sgd":
            ref_params = trainer.model.params()
            allowed = bound.step(rho_update, g, l2(ref_params))
            err = l2_difference(state.params, ref_params)
            assert err <= allowed, where + f"params differ by {err:.3e} (L2), bound {allowed:.3e}"
        else:
            mu_ref = trainer.optimizer_state("exp_avg")
            allowed = bound.step(rho_update, g, l2(mu_ref))
            err = l2_difference(state.opt_state.mu, mu_ref)
            assert err <= allowed, where + f"AdamW's first moment differs by {err:.3e}, bound {allowed:.3e}"
        applied += 1
    assert int(state.step) == applied


def _exact_gradient_drift(cfg, params, batch) -> tuple[float, float]:
    """``(||G(a) - G(b)||, | ||G(a)|| - ||G(b)|| |)`` for the exact (float64) gradient G of the
    step's loss at the two params trees ``params = (a, b)``, on the whole batch (accumulation does
    not change the exact gradient)."""
    labels = ImperativeTrainer.labels(batch.targets, batch.mask)
    count = (labels != -100).sum().clamp(min=1)
    grads = []
    for tree in params:
        model = ReferenceGPT.from_params(optree.tree_map(torch.Tensor.double, tree), cfg)
        logits = model(batch.tokens, attention_mask=batch.attention_mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                                 ignore_index=-100) / count
        loss.backward()
        grads.append(model.tree({n: p.grad for n, p in model.named_parameters()}))
    a, b = grads
    return l2_difference(a, b), abs(l2(a) - l2(b))


@examples(30)
@given(precise_configs, st.data(), st.sampled_from(["cast", "autocast"]), st.sampled_from(["sgd", "adamw"]))
def test_fp16_steps_match_the_grad_scaler_recipe_in_loss_grad_norm_skips_and_params(cfg, data, mode, opt_name):
    _check_against_the_recipe(cfg, data, "fp16", mode, opt_name)


@examples(30)
@given(precise_configs, st.data(), st.sampled_from(["cast", "autocast"]), st.sampled_from(["sgd", "adamw"]))
def test_bf16_steps_match_the_autocast_recipe_in_loss_grad_norm_and_params(cfg, data, mode, opt_name):
    _check_against_the_recipe(cfg, data, "bf16", mode, opt_name)


@examples(20)
@given(precise_configs, st.data(), st.sampled_from(["sgd", "adamw"]))
def test_fp32_steps_match_the_recipe_in_loss_grad_norm_and_params(cfg, data, opt_name):
    _check_against_the_recipe(cfg, data, "fp32", "cast", opt_name)


def test_fp16_skip_decisions_and_loss_scale_trajectory_match_grad_scaler_over_20_steps():
    cfg = fm.ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    data = fm.load_corpus()[:20_000] % 64
    params = fm.init_params(cfg, seed=1)
    init_scale, interval = 2.0**24, 3
    trainer = ImperativeTrainer(ReferenceGPT.from_params(params, cfg), lr=1e-3, precision="fp16",
                                accum_steps=2, max_grad_norm=1.0, init_scale=init_scale, growth_interval=interval)
    opt = fm.adamw(1e-3)
    # Autocast mode lowers the same forward ops as the recipe, so overflow happens in the same places.
    step = make_train_step(cfg, opt, policy="mixed_fp16", policy_mode="autocast", accum_steps=2, max_grad_norm=1.0)
    state = init_train_state(params, opt, loss_scale=fm.dynamic_loss_scale(init_scale, growth_interval=interval,
                                                                           min_loss_scale=0.0))
    ours, theirs = [], []
    for i in range(20):
        batch = fm.sample_batch(data, 4, 16, seed=5, index=i)
        ref = trainer.step(batch.tokens, batch.targets)
        state, m = step(state, batch)
        theirs.append((ref["loss_scale"], ref["skipped"]))
        ours.append((float(m["loss_scale"]), bool(m["skipped"])))
    assert ours == theirs
    assert any(s for _, s in ours) and not all(s for _, s in ours)  # the sequence exercises both branches
    assert float(state.loss_scale.loss_scale) == trainer.scaler.get_scale()


def test_the_recipe_masks_targets_the_hugging_face_way_and_rejects_fractional_masks():
    targets = torch.tensor([[1, 2, fm.IGNORE_INDEX]])
    assert ImperativeTrainer.labels(targets, torch.tensor([[1.0, 0.0, 1.0]])).tolist() == [[1, -100, -100]]
    with pytest.raises(ValueError, match="only 0 and 1"):
        ImperativeTrainer.labels(targets, torch.tensor([[0.5, 1.0, 1.0]]))
