import math

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_memopt import _tree
from functional_memopt._tree import tree_all_finite as all_finite
from functional_memopt.train.loss_scale import (
    NoOpLossScale,
    StaticLossScale,
    dynamic_loss_scale,
    no_op_loss_scale,
    static_loss_scale,
)
from functional_memopt.testing import assert_trees_equal

from _hypothesis import examples

# What each step's gradient looks like: finite, or with one non-finite entry.
KINDS = {
    "finite": [1.0, -2.0, 0.5],
    "inf": [1.0, math.inf, 0.5],
    "-inf": [-math.inf, -2.0, 0.5],
    "nan": [1.0, -2.0, math.nan],
}

kinds = st.sampled_from(sorted(KINDS))
growth_intervals = st.one_of(st.integers(1, 5), st.just(2000))
growth_factors = st.sampled_from([2.0, 1.5, 1.1, 3.0])
backoff_factors = st.sampled_from([0.5, 0.25, 0.9, 1 / 3])


def _run_against_grad_scaler(steps, *, initial, growth_interval, growth_factor, backoff_factor, min_loss_scale):
    """Drive a real GradScaler and the functional state side by side; yield both after each step."""
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=initial, growth_factor=growth_factor, backoff_factor=backoff_factor,
        growth_interval=growth_interval,
    )
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    state = dynamic_loss_scale(
        initial, growth_factor=growth_factor, backoff_factor=backoff_factor, growth_interval=growth_interval,
        min_loss_scale=min_loss_scale,
    )
    for kind in steps:
        c = torch.tensor(KINDS[kind])
        # Imperative recipe: a zeroed parameter stays zero exactly when the step is skipped.
        with torch.no_grad():
            p.zero_()
        opt.zero_grad(set_to_none=True)
        scaler.scale((p * c).sum()).backward()
        scaler.step(opt)
        scaler.update()
        ref_skipped = bool((p == 0).all())
        ref_unscaled = p.grad.clone()

        # Functional: GradScaler checks the scaled gradients, so the finiteness flag does too.
        grads = torch.func.grad(lambda q, s=state: s.scale((q * c).sum()))(torch.zeros(3))
        finite = all_finite(grads)
        unscaled = state.unscale(grads)
        state = state.adjust(finite)
        yield scaler, state, ref_skipped, not bool(finite), ref_unscaled, unscaled


@given(
    steps=st.lists(kinds, max_size=60),
    initial=st.floats(1e-3, 1e9),
    growth_interval=growth_intervals,
    growth_factor=growth_factors,
    backoff_factor=backoff_factors,
)
def test_dynamic_loss_scale_without_floor_follows_grad_scaler_for_any_sequence(
    steps, initial, growth_interval, growth_factor, backoff_factor
):
    run = _run_against_grad_scaler(
        steps, initial=initial, growth_interval=growth_interval, growth_factor=growth_factor,
        backoff_factor=backoff_factor, min_loss_scale=0.0,
    )
    for i, (scaler, state, ref_skipped, skipped, ref_unscaled, unscaled) in enumerate(run):
        assert skipped == ref_skipped, f"step {i}: skip decision differs"
        assert state.loss_scale.item() == scaler.get_scale(), f"step {i}: scale differs"
        assert state.counter.item() == scaler.state_dict()["_growth_tracker"], f"step {i}: counter differs"
        assert_trees_equal(unscaled, ref_unscaled, msg=f"step {i}: ")


@given(
    steps=st.lists(kinds, max_size=60),
    exponent=st.integers(0, 20),
    growth_interval=growth_intervals,
    growth_factor=growth_factors,
    backoff_factor=backoff_factors,
)
def test_dynamic_loss_scale_with_default_floor_follows_grad_scaler_while_its_scale_stays_at_least_one(
    steps, exponent, growth_interval, growth_factor, backoff_factor
):
    run = _run_against_grad_scaler(
        steps, initial=2.0**exponent, growth_interval=growth_interval, growth_factor=growth_factor,
        backoff_factor=backoff_factor, min_loss_scale=1.0,
    )
    below = False
    for i, (scaler, state, ref_skipped, skipped, _, _) in enumerate(run):
        assert skipped == ref_skipped, f"step {i}: skip decision differs"
        assert state.loss_scale.item() >= 1.0, f"step {i}: scale fell below the floor"
        below = below or scaler.get_scale() < 1.0
        if not below:
            assert state.loss_scale.item() == scaler.get_scale(), f"step {i}: scale differs"
            assert state.counter.item() == scaler.state_dict()["_growth_tracker"], f"step {i}: counter differs"


def test_dynamic_loss_scale_grows_after_exactly_the_default_2000_finite_steps_like_grad_scaler():
    steps = ["finite"] * 3 + ["inf"] + ["finite"] * 2001 + ["nan"] + ["finite"] * 5
    run = _run_against_grad_scaler(
        steps, initial=2.0**16, growth_interval=2000, growth_factor=2.0, backoff_factor=0.5, min_loss_scale=1.0
    )
    scales = []
    for scaler, state, *_ in run:
        assert state.loss_scale.item() == scaler.get_scale()
        assert state.counter.item() == scaler.state_dict()["_growth_tracker"]
        scales.append(state.loss_scale.item())
    assert scales[3] == 2.0**15 and scales[4 + 1998] == 2.0**15 and scales[4 + 1999] == 2.0**16
    assert scales[-1] == 2.0**15


def _plain_floored_reference(flags, *, initial, growth_interval, growth_factor, backoff_factor, floor):
    """A plain Python loop of the rule with a floor, rounding to float32 as the kernel does."""
    to_f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    scale, counter, out = to_f32(initial), 0, []
    for finite in flags:
        if finite:
            counter += 1
            if counter == growth_interval:
                grown = to_f32(scale * growth_factor)
                scale = grown if math.isfinite(grown) else scale
                counter = 0
        else:
            scale, counter = max(to_f32(scale * backoff_factor), to_f32(floor)), 0
        out.append((scale, counter))
    return out


@given(
    flags=st.lists(st.booleans(), max_size=60),
    growth_interval=st.integers(1, 5),
    backoff_factor=backoff_factors,
    floor=st.sampled_from([1.0, 0.75, 4.0]),
)
def test_dynamic_loss_scale_never_falls_below_min_loss_scale_and_matches_a_plain_loop(
    flags, growth_interval, backoff_factor, floor
):
    kw = dict(initial=8.0, growth_interval=growth_interval, growth_factor=2.0, backoff_factor=backoff_factor)
    expected = _plain_floored_reference(flags, floor=floor, **kw)
    state = dynamic_loss_scale(
        8.0, growth_interval=growth_interval, growth_factor=2.0, backoff_factor=backoff_factor, min_loss_scale=floor
    )
    for i, finite in enumerate(flags):
        state = state.adjust(torch.tensor(finite))
        assert (state.loss_scale.item(), state.counter.item()) == expected[i], f"step {i}"
        assert state.loss_scale.item() >= floor


def test_dynamic_loss_scale_does_not_grow_past_the_float32_range_but_restarts_its_counter():
    state = dynamic_loss_scale(2.0**127, growth_interval=1, min_loss_scale=0.0)
    state = state.adjust(torch.tensor(True))
    assert state.loss_scale.item() == 2.0**127 and state.counter.item() == 0


def _small_problem(seed, width, depth, use_tanh):
    g = torch.Generator().manual_seed(seed)
    params = [{"w": torch.randn(width, width, generator=g), "b": torch.randn(width, generator=g)} for _ in range(depth)]
    x = torch.randn(4, width, generator=g)

    def loss(ps):
        h = x
        for p in ps:
            h = torch.nn.functional.linear(h, p["w"], p["b"])
            h = torch.tanh(h) if use_tanh else h
        return (h * h).sum() * 0.1

    return params, loss


@examples(50)
@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.integers(1, 8),
    depth=st.integers(1, 3),
    use_tanh=st.booleans(),
    k=st.integers(-10, 40),
    dynamic=st.booleans(),
)
def test_unscaled_gradient_of_a_power_of_two_scaled_loss_equals_the_plain_gradient_bitwise(
    seed, width, depth, use_tanh, k, dynamic
):
    params, loss = _small_problem(seed, width, depth, use_tanh)
    scale = dynamic_loss_scale(2.0**k, min_loss_scale=0.0) if dynamic else static_loss_scale(2.0**k)
    scaled_grads = torch.func.grad(lambda p: scale.scale(loss(p)))(params)
    assert bool(all_finite(scaled_grads))
    assert_trees_equal(scale.unscale(scaled_grads), torch.func.grad(loss)(params))


def test_unscaled_gradient_of_the_scaled_model_loss_equals_the_plain_gradient_bitwise():
    from functional_memopt import ModelConfig, init_params, loss_fn

    cfg = ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
    params = init_params(cfg, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, 32, (2, 16), generator=g), torch.randint(0, 32, (2, 16), generator=g)
    scale = dynamic_loss_scale()  # 2**16

    def plain(p):
        return loss_fn(p, tokens, targets, cfg)[0]

    scaled_grads = torch.func.grad(lambda p: scale.scale(plain(p)))(params)
    assert_trees_equal(scale.unscale(scaled_grads), torch.func.grad(plain)(params))


def test_unscale_returns_float32_for_half_gradients_and_leaves_integer_leaves_alone():
    tree = {"h": torch.tensor([4.0, 8.0], dtype=torch.float16), "b": torch.tensor([2.0], dtype=torch.bfloat16),
            "i": torch.tensor([3])}
    out = static_loss_scale(4.0).unscale(tree)
    assert_trees_equal(out, {"h": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5]), "i": torch.tensor([3])})


def test_scaling_a_half_loss_by_the_default_scale_does_not_overflow():
    out = dynamic_loss_scale().scale(torch.ones(2, dtype=torch.float16))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("finite", [True, False])
def test_static_and_no_op_loss_scales_behave_trivially(finite):
    x = {"a": torch.tensor([1.5, -3.0]), "n": torch.tensor(7)}
    static = static_loss_scale(8.0)
    assert_trees_equal(static.scale(x), {"a": torch.tensor([12.0, -24.0]), "n": torch.tensor(7)})
    assert_trees_equal(static.unscale(static.scale(x)), x)
    assert static.adjust(torch.tensor(finite)) is static
    noop = no_op_loss_scale()
    assert_trees_equal(noop.scale(x), x)
    assert_trees_equal(noop.unscale(x), x)
    assert noop.adjust(torch.tensor(finite)) is noop
    assert noop.loss_scale.item() == 1.0


def _non_default_states():
    dyn = dynamic_loss_scale(
        1024.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7, min_loss_scale=2.0
    )._replace(counter=torch.tensor(5))
    return [NoOpLossScale(), StaticLossScale(torch.tensor(3.0)), dyn]


@pytest.mark.parametrize("state", _non_default_states(), ids=lambda s: type(s).__name__)
def test_every_field_of_every_loss_scale_survives_flatten_and_unflatten(state):
    leaves, spec = optree.tree_flatten(state)
    assert len(leaves) == len(state._fields)
    rebuilt = optree.tree_unflatten(spec, leaves)
    assert type(rebuilt) is type(state)
    assert_trees_equal(rebuilt, state)
    for name in state._fields:
        assert torch.equal(getattr(rebuilt, name), getattr(state, name)), name
    by_path = _tree.tree_unflatten_from_paths(_tree.tree_flatten_with_paths(state), state)
    assert_trees_equal(by_path, state)


DYNAMIC_DTYPES = {"loss_scale": torch.float32, "counter": torch.int64, "growth_interval": torch.int64,
                  "growth_factor": torch.float64, "backoff_factor": torch.float64, "min_loss_scale": torch.float32}


def test_dynamic_state_fields_have_the_documented_shapes_and_dtypes():
    state = dynamic_loss_scale()
    assert {k: getattr(state, k).dtype for k in state._fields} == DYNAMIC_DTYPES
    assert all(getattr(state, k).shape == () for k in state._fields)
    assert (state.loss_scale.item(), state.counter.item(), state.growth_interval.item()) == (2.0**16, 0, 2000)
    assert (state.growth_factor.item(), state.backoff_factor.item(), state.min_loss_scale.item()) == (2.0, 0.5, 1.0)


def test_field_dtypes_stay_as_documented_under_a_float64_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dynamic, static = dynamic_loss_scale(), static_loss_scale(4.0)
    finally:
        torch.set_default_dtype(before)
    assert {k: getattr(dynamic, k).dtype for k in dynamic._fields} == DYNAMIC_DTYPES
    assert static.loss_scale.dtype == torch.float32


def test_every_field_is_made_on_the_device_asked_for():
    # The meta device stands in for an accelerator: its tensors hold no data but keep their device.
    from functional_memopt.train.loss_scale import loss_scale_from_spec

    states = [static_loss_scale(2.0, device="meta"), dynamic_loss_scale(device="meta"),
              loss_scale_from_spec("dynamic", device="meta"), loss_scale_from_spec("8", device="meta")]
    for state in states:
        assert {k: getattr(state, k).device.type for k in state._fields} == dict.fromkeys(state._fields, "meta")


def test_adjust_does_not_branch_on_tensor_values_so_it_runs_under_vmap():
    flags = torch.tensor([True, False, True, True])
    states = [dynamic_loss_scale(16.0, growth_interval=2)._replace(counter=torch.tensor(c)) for c in (0, 1, 1, 0)]
    batched = optree.tree_map(lambda *xs: torch.stack(xs), *states)
    out = torch.func.vmap(lambda s, f: s.adjust(f))(batched, flags)
    for i, s in enumerate(states):
        assert_trees_equal(optree.tree_map(lambda x: x[i], out), s.adjust(flags[i]))


def test_adjust_leaves_its_input_state_unchanged():
    state = dynamic_loss_scale(16.0, growth_interval=1)
    before = optree.tree_map(torch.clone, state)
    state.adjust(torch.tensor(True))
    state.adjust(torch.tensor(False))
    assert_trees_equal(state, before)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"initial": 0.0}, "initial"),
        ({"initial": -1.0}, "initial"),
        ({"initial": math.inf}, "initial"),
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"growth_factor": 0.5}, "growth_factor"),
        ({"backoff_factor": 1.0}, "backoff_factor"),
        ({"backoff_factor": 0.0}, "backoff_factor"),
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"min_loss_scale": -1.0}, "min_loss_scale"),
        ({"initial": 2.0, "min_loss_scale": 4.0}, "min_loss_scale"),
    ],
)
def test_dynamic_loss_scale_rejects_bad_hyper_parameters_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^dynamic_loss_scale: {name}"):
        dynamic_loss_scale(**kwargs)


@pytest.mark.parametrize("value", [0.0, -2.0, math.nan])
def test_static_loss_scale_rejects_a_non_positive_scale(value):
    with pytest.raises(ValueError, match=r"^static_loss_scale: loss_scale"):
        static_loss_scale(value)


def test_loss_scale_specs_name_none_dynamic_or_a_number_and_nothing_else():
    from functional_memopt.train.loss_scale import DynamicLossScale, loss_scale_from_spec

    assert isinstance(loss_scale_from_spec(" None "), NoOpLossScale)
    assert isinstance(loss_scale_from_spec("dynamic"), DynamicLossScale)
    assert float(loss_scale_from_spec(1024).loss_scale) == 1024.0
    for bad in ("abc", "inf", "0", "-4", "nan"):
        with pytest.raises(ValueError, match=r"^loss_scale_from_spec: a loss scale is none, dynamic or a number > 0"):
            loss_scale_from_spec(bad)


def test_factories_take_one_element_float_tensors_as_numbers():
    assert float(static_loss_scale(torch.tensor(8.0)).loss_scale) == 8.0
    assert float(dynamic_loss_scale(torch.tensor(16.0), growth_factor=torch.tensor(4.0)).growth_factor) == 4.0


@pytest.mark.parametrize("name", ["growth_factor", "backoff_factor", "min_loss_scale", "initial"])
def test_dynamic_loss_scale_names_an_argument_that_is_not_a_number(name):
    with pytest.raises(TypeError, match=rf"^dynamic_loss_scale: {name} must be a Python number"):
        dynamic_loss_scale(**{name: "2"})


def test_factories_reject_wrong_types():
    with pytest.raises(TypeError, match="growth_interval"):
        dynamic_loss_scale(growth_interval=2.5)
    with pytest.raises(TypeError, match="loss_scale"):
        static_loss_scale("big")
