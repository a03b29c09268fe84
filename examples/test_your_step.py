"""Property-test your own training step with functional_memopt.testing.

Run:
    python examples/test_your_step.py        (or: pytest examples/test_your_step.py)

Here "your" loss is label-smoothed cross-entropy on the library's model; the same assertions take
any ``loss_fn(params, batch) -> (loss_sum, token_count)`` and any ``step(state, batch)``.

The last four properties are metamorphic: they compare your step with itself on inputs that must
give the same answer (a power-of-two loss scale, k micro-batches, a mask written as IGNORE_INDEX,
a learning rate below the compute dtype's resolution), so they need no expected values.
"""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import testing


def make_my_loss(cfg, smoothing=0.1):
    def my_loss(params, batch):
        logits = fm.apply(params, batch.tokens, cfg, attention_mask=batch.attention_mask, check=False)
        wide = torch.promote_types(logits.dtype, torch.float32)  # fp32 for half, fp64 stays fp64
        nll = F.cross_entropy(logits.to(wide).flatten(0, 1), batch.targets.flatten(), reduction="none",
                              ignore_index=fm.IGNORE_INDEX, label_smoothing=smoothing)
        weight = (batch.targets.flatten() != fm.IGNORE_INDEX).to(wide) * batch.mask.flatten().to(wide)
        return (nll * weight).sum(), weight.sum()

    return my_loss


@settings(max_examples=10, deadline=None)
@given(testing.configs(), st.data())
def test_my_loss_accumulates_exactly_over_ragged_micro_batches(cfg, data):
    params = data.draw(testing.params(cfg, dtype=torch.float64))
    batch = data.draw(testing.ragged_batches(cfg, max_rows=5))
    k = data.draw(testing.accumulation_steps(batch.size))
    testing.assert_accumulation_equivalent(make_my_loss(cfg), params, batch, k)


@settings(max_examples=10, deadline=None)
@given(testing.configs(vocab_size=32, min_head_dim=4), testing.policies(reduced_only=True), st.data())
def test_my_loss_under_half_precision_stays_within_epsilon_tolerances(cfg, policy, data):
    params = data.draw(testing.params(cfg))
    batch = data.draw(testing.token_batches(cfg, min_rows=2, min_len=4))
    testing.assert_precision_close(make_my_loss(cfg), params, batch, policy)


@settings(max_examples=5, deadline=None)
@given(testing.configs(), testing.nonfinite_values(), st.data())
def test_my_step_skips_nonfinite_gradients_without_touching_the_state(cfg, bad, data):
    opt = fm.adamw(1e-3)
    my_step = fm.make_train_step(cfg, opt, loss_fn=testing.poison(make_my_loss(cfg), bad), accum_steps=1)
    state = fm.init_train_state(data.draw(testing.params(cfg)), opt, loss_scale=fm.dynamic_loss_scale())
    testing.assert_skipped_step_is_noop(my_step, state, data.draw(testing.ragged_batches(cfg)))


def make_my_step(cfg, *, k=1, lr=0.1, policy="mixed_bf16", max_grad_norm=0.01):
    return fm.make_train_step(cfg, fm.sgd(lr, momentum=0.9), loss_fn=make_my_loss(cfg), policy=policy, accum_steps=k,
                              max_grad_norm=max_grad_norm)


def my_state(cfg, params, policy="mixed_bf16"):
    return fm.init_train_state(params, fm.sgd(1.0, momentum=0.9), policy=policy)


@settings(max_examples=10, deadline=None)
@given(testing.configs(vocab_size=32), st.data())
def test_my_step_does_not_depend_on_a_power_of_two_loss_scale(cfg, data):
    batch = data.draw(testing.masked_batches(cfg))
    step = make_my_step(cfg, k=data.draw(testing.accumulation_steps(batch.size)))
    scales = data.draw(st.lists(testing.powers_of_two(0, 20), min_size=2, max_size=2, unique=True))
    testing.assert_loss_scale_invariant(step, my_state(cfg, data.draw(testing.params(cfg))), batch, scales=scales)


@settings(max_examples=10, deadline=None)
@given(testing.configs(vocab_size=32, min_head_dim=4), st.data())
def test_my_step_with_k_micro_batches_is_my_step_with_one(cfg, data):
    batch = data.draw(testing.masked_batches(cfg, min_rows=2, max_rows=6, min_len=4))
    ks = [data.draw(st.integers(2, batch.size))]
    # Each micro-batch's weight gradients are rounded to bfloat16: tolerance in its epsilons.
    rtol = testing.tolerance(torch.bfloat16, factor=testing.GRAD_TOLERANCE_FACTOR)
    testing.assert_accumulation_invariant(lambda k: make_my_step(cfg, k=k), my_state(cfg, data.draw(testing.params(cfg))),
                                          batch, ks, rtol=rtol)


@settings(max_examples=10, deadline=None)
@given(testing.configs(vocab_size=32), st.data())
def test_my_step_counts_a_masked_target_as_an_ignored_one(cfg, data):
    batch = data.draw(testing.masked_batches(cfg, min_len=2))
    step = make_my_step(cfg, k=data.draw(testing.accumulation_steps(batch.size)))
    testing.assert_mask_equivalent(step, my_state(cfg, data.draw(testing.params(cfg))), batch)


@settings(max_examples=5, deadline=None)
@given(testing.configs(vocab_size=32, min_head_dim=4), st.data())
def test_my_float32_masters_keep_updates_below_half_a_bfloat16_ulp(cfg, data):
    batch = data.draw(testing.masked_batches(cfg))
    testing.assert_master_precision(lambda lr: make_my_step(cfg, lr=lr, max_grad_norm=None),
                                    my_state(cfg, data.draw(testing.params(cfg))), batch, lr=1e-4,
                                    compute_dtype=torch.bfloat16)


if __name__ == "__main__":
    for test in (test_my_loss_accumulates_exactly_over_ragged_micro_batches,
                 test_my_loss_under_half_precision_stays_within_epsilon_tolerances,
                 test_my_step_skips_nonfinite_gradients_without_touching_the_state,
                 test_my_step_does_not_depend_on_a_power_of_two_loss_scale,
                 test_my_step_with_k_micro_batches_is_my_step_with_one,
                 test_my_step_counts_a_masked_target_as_an_ignored_one,
                 test_my_float32_masters_keep_updates_below_half_a_bfloat16_ulp):
        test()
        print(f"held: {test.__name__}")
    print("all properties hold")
