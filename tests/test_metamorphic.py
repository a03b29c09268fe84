"""The kit's metamorphic assertions: each holds on the library's step and catches its bug class.

Every assertion is run three ways: as a property of the library's step over drawn configs,
batches, masks, policies and k; on a correct hand-written step (tests/_broken_steps.py); and on
the same hand-written step with one planted bug, where it must fail.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.train.step import init_train_state, make_train_step

from _broken_steps import make_user_step
from _hypothesis import examples

# Tiny models run fastest on one thread, and on a busy machine a second thread made a property
# ten times slower (6 s against 64 s for 50 examples).
pytestmark = pytest.mark.usefixtures("one_thread")

FP64 = "params=float64,compute=float64,output=float64"
# Relative errors need gradients that are not mostly cancellation (testing/tolerances.py): widths of
# 4 and more, vocabularies of 16 and more.
precise_configs = testing.configs(max_layer=2, max_head=2, min_head_dim=4, max_head_dim=6, max_block=8,
                                  vocab_size=None).filter(lambda c: c.vocab_size >= 16)
optimizers = st.sampled_from(["sgd", "adamw"])


def _optimizer(name, lr=0.1):
    return fm.sgd(lr, momentum=0.9, weight_decay=0.01) if name == "sgd" else fm.adamw(lr / 100, weight_decay=0.1)


def _state(cfg, opt, seed=0, policy=None, loss_scale=None):
    return init_train_state(fm.init_params(cfg, seed=seed), opt, policy=policy, loss_scale=loss_scale)


# ----------------------------------------------------------------------------- loss-scale invariance


@examples(50)
@given(testing.configs(max_layer=2, max_head=2, max_head_dim=4, max_block=8), st.data(),
       st.sampled_from(["fp32", "mixed_bf16"]), optimizers, st.sampled_from(["cast", "autocast"]))
def test_the_library_step_does_not_depend_on_a_power_of_two_loss_scale(cfg, data, policy, opt_name, mode):
    # Bitwise: float32 and bfloat16 share float32's exponent range, so scaling by 2**e neither
    # overflows nor underflows and unscaling is exact (invariant 2). Clipping is active
    # (max_grad_norm far below any gradient norm here), so the clip coefficient is compared too.
    batch = data.draw(testing.masked_batches(cfg, max_rows=4))
    k = data.draw(testing.accumulation_steps(batch.size))
    scales = data.draw(st.lists(testing.powers_of_two(-4, 24), min_size=2, max_size=2, unique=True))
    opt = _optimizer(opt_name)
    step = make_train_step(cfg, opt, policy=policy, policy_mode=mode, accum_steps=k, max_grad_norm=1e-4)
    testing.assert_loss_scale_invariant(step, _state(cfg, opt, seed=data.draw(st.integers(0, 99))), batch,
                                        scales=scales)


@pytest.mark.parametrize("bug", ["clip_scaled_norm", "no_unscale", "double_unscale"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_loss_scale_invariance_catches_scaled_clipping_and_missing_or_double_unscaling(bug, opt_name):
    cfg, batch = _problem()
    opt = _optimizer(opt_name)
    state = _state(cfg, opt)
    good = make_user_step(cfg, opt, accum_steps=2, max_grad_norm=1e-2)
    testing.assert_loss_scale_invariant(good, state, batch)
    with pytest.raises(AssertionError, match="loss scale"):
        testing.assert_loss_scale_invariant(make_user_step(cfg, opt, accum_steps=2, max_grad_norm=1e-2, bug=bug),
                                            state, batch)


def test_loss_scale_invariance_rejects_scales_that_are_not_powers_of_two_and_steps_that_overflow():
    cfg, batch = _problem()
    opt = fm.sgd(0.1)
    step = make_train_step(cfg, opt)
    with pytest.raises(ValueError, match="powers of two"):
        testing.assert_loss_scale_invariant(step, _state(cfg, opt), batch, scales=(1.0, 3.0))
    with pytest.raises(ValueError, match="two or more"):
        testing.assert_loss_scale_invariant(step, _state(cfg, opt), batch, scales=(4.0, 4.0))
    fp16 = make_train_step(cfg, opt, policy="mixed_fp16")
    with pytest.raises(AssertionError, match="skipped"):  # 2**40 overflows float16: the relation says nothing
        testing.assert_loss_scale_invariant(fp16, _state(cfg, opt), batch, scales=(1.0, 2.0**40))


# ----------------------------------------------------------------------------- accumulation invariance


@examples(50)
@given(precise_configs, st.data(), st.sampled_from([FP64, "fp32", "mixed_bf16"]))
def test_the_library_step_with_k_micro_batches_is_the_step_with_one(cfg, data, policy):
    # Tolerance: micro-batches reassociate the sums over tokens, and under a half-precision compute
    # dtype each micro-batch's weight gradient is rounded to it. Each gradient element runs a chain
    # of some 10 to 20 rounded ops a block, so both runs sit within GRAD_TOLERANCE_FACTOR epsilons of
    # the exact gradient (testing/tolerances.py) and the compute dtype's epsilon sets the scale.
    batch = data.draw(testing.masked_batches(cfg, min_rows=2, max_rows=6, min_len=4))
    ks = data.draw(st.lists(st.integers(2, batch.size), min_size=1, max_size=2, unique=True))
    opt = fm.sgd(0.1, momentum=0.9)
    compute = fm.get_policy(policy).compute_dtype
    tol = testing.tolerance(compute, factor=testing.GRAD_TOLERANCE_FACTOR)
    testing.assert_accumulation_invariant(
        lambda k: make_train_step(cfg, opt, policy=policy, accum_steps=k, max_grad_norm=1.0),
        _state(cfg, opt, seed=data.draw(st.integers(0, 99)), policy=policy), batch, ks, rtol=tol)


def _toy_steps(update, differ):
    """``k -> step`` moving float32 params by ``update``; the k > 1 steps by ``differ(update)`` instead."""
    def make(k):
        u = update if k == 1 else differ(update)
        return lambda state, batch: (state._replace(params={"w": (state.params["w"] + u).float()}), {})
    return make


def test_the_accumulation_bound_allows_the_rounding_of_the_new_params_and_no_more():
    # Params of about 1 moved by updates of about 1e-3: rounding p + u to float32 can put two
    # updates equal to the last bit an ulp of p apart (2**-23 of p: 1.2e-4 of this update), which
    # the bound allows; an update 1e-3 off (a micro-batch mis-weighted by 0.1%) it does not.
    state = fm.init_train_state({"w": torch.ones(1000)}, fm.sgd(0.1))
    u = torch.full((1000,), 1e-3)
    ulp_apart = lambda u: u + torch.where(torch.arange(1000) < 10, 2.0 ** -23, 0.0)  # noqa: E731
    testing.assert_accumulation_invariant(_toy_steps(u, ulp_apart), state, None, ks=(2,))
    with pytest.raises(AssertionError, match=r"the update differs by 9\.5\d+e-04"):
        testing.assert_accumulation_invariant(_toy_steps(u, lambda u: u * 1.001), state, None, ks=(2,))


def test_accumulation_invariance_catches_a_mean_of_per_micro_batch_means():
    cfg, batch = _problem()  # rows with 7, 1, 5 and 2 counted targets: the two halves differ
    opt = fm.sgd(0.1)
    state = _state(cfg, opt, policy=FP64)
    testing.assert_accumulation_invariant(lambda k: make_user_step(cfg, opt, policy=FP64, accum_steps=k), state,
                                          batch, ks=(2, 4))
    with pytest.raises(AssertionError, match="micro-batches against 1"):
        testing.assert_accumulation_invariant(
            lambda k: make_user_step(cfg, opt, policy=FP64, accum_steps=k, bug="mean_of_means"), state, batch, ks=(2, 4))


# ----------------------------------------------------------------------------- mask equivalence


@examples(50)
@given(testing.configs(max_layer=2, max_head=2, max_head_dim=4, max_block=8), st.data(),
       st.sampled_from(["fp32", "mixed_bf16", "mixed_fp16"]), optimizers, st.sampled_from(["cast", "autocast"]))
def test_a_masked_target_counts_exactly_as_an_ignored_one_through_the_whole_step_for_any_k(cfg, data, policy,
                                                                                         opt_name, mode):
    # Bitwise: a masked target's loss is multiplied by an exact 0 and its gradient is 0, so both
    # batches run the same arithmetic on the same counted tokens.
    batch = data.draw(testing.masked_batches(cfg, max_rows=5, min_len=2))
    k = data.draw(testing.accumulation_steps(batch.size))
    opt = _optimizer(opt_name)
    ls = fm.static_loss_scale(2.0**8) if policy == "mixed_fp16" else None
    step = make_train_step(cfg, opt, policy=policy, policy_mode=mode, accum_steps=k, max_grad_norm=1.0)
    testing.assert_mask_equivalent(step, _state(cfg, opt, seed=data.draw(st.integers(0, 99)), loss_scale=ls), batch)


@pytest.mark.parametrize("k", [1, 2])
def test_mask_equivalence_catches_a_token_count_that_ignores_the_mask(k):
    cfg, batch = _problem()
    opt = fm.sgd(0.1)
    testing.assert_mask_equivalent(make_user_step(cfg, opt, accum_steps=k), _state(cfg, opt), batch)
    with pytest.raises(AssertionError, match="mask 0 against IGNORE_INDEX"):
        testing.assert_mask_equivalent(make_user_step(cfg, opt, accum_steps=k, bug="count_ignores_mask"),
                                       _state(cfg, opt), batch)


def test_mask_equivalence_needs_a_mask_that_leaves_out_a_counted_target():
    cfg, batch = _problem()
    step = make_train_step(cfg, fm.sgd(0.1))
    with pytest.raises(ValueError, match="no loss mask"):
        testing.assert_mask_equivalent(step, _state(cfg, fm.sgd(0.1)), batch._replace(mask=None))
    real = (batch.targets != fm.IGNORE_INDEX).float()
    with pytest.raises(ValueError, match="nothing to compare"):
        testing.assert_mask_equivalent(step, _state(cfg, fm.sgd(0.1)), batch._replace(mask=real))


# ----------------------------------------------------------------------------- master precision


@examples(25)
@given(precise_configs, st.data(),
       st.sampled_from(["mixed_bf16", "mixed_fp16"]), optimizers, st.sampled_from(["cast", "autocast"]))
def test_the_library_step_keeps_updates_below_half_a_compute_ulp_in_its_float32_masters(cfg, data, policy, opt_name,
                                                                                      mode):
    # lr: SGD moves a master by lr * |g| and AdamW by about lr, while half an ulp of bfloat16
    # (float16) at an init-scale weight of 0.02 is 6e-5 (8e-6): at these rates most updates are
    # far below it and still above half a float32 ulp (1e-9), so float32 masters must keep them.
    # Widths of 4 and more: at width 1 layer norm leaves no gradient at all, and nothing moves.
    batch = data.draw(testing.masked_batches(cfg, max_rows=4))
    lr = 1e-4 if opt_name == "sgd" else 1e-7
    make = (lambda r: fm.sgd(r, momentum=0.9)) if opt_name == "sgd" else (lambda r: fm.adamw(r, weight_decay=0.1))
    ls = fm.static_loss_scale(2.0**8) if policy == "mixed_fp16" else None
    state = _state(cfg, make(1.0), seed=data.draw(st.integers(0, 99)), policy=policy, loss_scale=ls)
    testing.assert_master_precision(lambda r: make_train_step(cfg, make(r), policy=policy, policy_mode=mode), state,
                                    batch, lr=lr, compute_dtype=fm.get_policy(policy).compute_dtype)


@pytest.mark.parametrize("policy", ["mixed_bf16", "mixed_fp16"])
def test_master_precision_catches_masters_rounded_to_the_compute_dtype(policy):
    cfg, batch = _problem()
    compute = fm.get_policy(policy).compute_dtype
    state = _state(cfg, fm.sgd(1.0), policy=policy, loss_scale=fm.static_loss_scale(2.0**8))
    testing.assert_master_precision(lambda r: make_user_step(cfg, fm.sgd(r), policy=policy), state, batch, lr=1e-4,
                                    compute_dtype=compute)
    with pytest.raises(AssertionError, match="master precision"):
        testing.assert_master_precision(lambda r: make_user_step(cfg, fm.sgd(r), policy=policy, bug="round_masters"),
                                        state, batch, lr=1e-4, compute_dtype=compute)


def test_master_precision_asks_for_a_smaller_rate_or_for_wider_masters():
    cfg, batch = _problem()
    state = _state(cfg, fm.sgd(1.0), policy="mixed_bf16")
    with pytest.raises(ValueError, match="lower lr"):
        testing.assert_master_precision(lambda r: make_train_step(cfg, fm.sgd(r), policy="mixed_bf16"), state, batch,
                                        lr=1e6, compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="wider"):
        testing.assert_master_precision(lambda r: make_train_step(cfg, fm.sgd(r)), state, batch, lr=1e-4,
                                        compute_dtype=torch.float32)


# ----------------------------------------------------------------------------- helpers


def test_update_error_measures_the_update_not_the_params():
    old = {"w": torch.full((4,), 1.0)}
    assert testing.update_error({"w": old["w"] + 1e-3}, {"w": old["w"] + 1e-3}, old) == 0.0
    # A step that never moved is a 100% error, however close the params themselves are.
    assert testing.update_error(old, {"w": old["w"] + 1e-6}, old) == pytest.approx(1.0, rel=1e-6)
    assert testing.update_error(old, old, old) == 0.0


@given(testing.configs(max_block=8), st.data())
def test_masked_batches_leave_out_real_targets_by_mask_and_padding_by_ignore_index(cfg, data):
    batch = data.draw(testing.masked_batches(cfg, max_rows=4))
    real = batch.attention_mask
    assert bool((batch.targets[~real] == fm.IGNORE_INDEX).all()) and bool((batch.mask[~real] == 0).all())
    assert bool((batch.targets[real] != fm.IGNORE_INDEX).all()) and float(batch.mask.sum()) >= 1
    if int(real.sum()) >= 2:  # some real target is left out by the mask alone
        assert bool(((batch.mask == 0) & real).any())


def _problem():
    """A fixed config and a batch whose rows count 7, 1, 5 and 2 targets (mask and padding both)."""
    cfg = fm.ModelConfig(vocab_size=24, block_size=8, n_layer=2, n_head=2, n_embd=8)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 24, (4, 8), generator=g)
    targets = torch.randint(0, 24, (4, 8), generator=g)
    real = torch.arange(8)[None] < torch.tensor([8, 3, 6, 8])[:, None]
    mask = real.clone()
    mask[0, 2] = mask[1, 0] = mask[1, 1] = mask[2, 0] = mask[3, 1:7] = False
    return cfg, fm.Batch(tokens, torch.where(real, targets, fm.IGNORE_INDEX), mask.float(), real)


def test_the_accumulation_assertion_holds_the_fold_against_plain_autograd_and_catches_a_mean_loss():
    # assert_accumulation_equivalent computes the full-batch gradient by plain torch.autograd.grad,
    # so a loss_fn that returns per-micro-batch means (count 1) folds to a mean of means and fails.
    cfg, batch = _problem()
    params = fmtree.tree_cast(fm.init_params(cfg, seed=0), torch.float64)
    loss = fm.make_loss_fn(cfg)
    testing.assert_accumulation_equivalent(loss, params, batch, 2)

    def mean_loss(p, b):
        s, c = loss(p, b)
        return s / c.clamp(min=1), torch.ones_like(c)

    with pytest.raises(AssertionError, match="accumulation over 2 micro-batches"):
        testing.assert_accumulation_equivalent(mean_loss, params, batch, 2)
