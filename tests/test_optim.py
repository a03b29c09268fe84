import copy

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import (GradientTransformation, adamw, apply_updates, chain, clip_by_global_norm, decay_mask, sgd,
                               update_and_apply)
from functional_memopt.optim.adamw import ScaleByAdamState
from functional_memopt.optim.base import EmptyState
from functional_memopt.optim.sgd import SgdState
from functional_memopt.optim.adamw_kernel import _fusable
from functional_memopt.optim.schedules import warmup_cosine
from functional_memopt.testing import assert_trees_close, assert_trees_equal

STEPS = 50
# Within 1e-6, absolute or relative to the value: the two sides round products at different places
# (e.g. torch adds alpha * d in one kernel), a few ulps apart after 50 steps on values near 4.
TOL = dict(rtol=1e-6, atol=1e-6)


def make_params(seed=0):
    """A small tree with several shapes, a 0-d leaf and nesting."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 3, generator=g),
        "b": torch.randn(5, generator=g),
        "scalar": torch.randn((), generator=g),
        "block": [{"k": torch.randn(2, 3, 4, generator=g)}, {"k": torch.randn(4, 1, generator=g)}],
    }


def random_grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 10_000 + step)
    return optree.tree_map(lambda p: torch.randn(p.shape, generator=g), params)


def torch_leaves(params):
    return [torch.nn.Parameter(x.clone()) for x in optree.tree_leaves(params)]


def run_functional(opt, params, steps=STEPS):
    state = opt.init(params)
    for i in range(steps):
        updates, state = opt.update(random_grads(params, i), state, params)
        params = apply_updates(params, updates)
    return params, state


def run_torch(make_opt, params, steps=STEPS, scheduler=None):
    leaves = torch_leaves(params)
    spec = optree.tree_structure(params)
    opt = make_opt(leaves)
    sched = scheduler(opt) if scheduler else None
    for i in range(steps):
        for p, gr in zip(leaves, optree.tree_leaves(random_grads(params, i))):
            p.grad = gr.clone()
        opt.step()
        if sched:
            sched.step()
    return optree.tree_unflatten(spec, [p.detach() for p in leaves]), opt, leaves


@pytest.mark.parametrize(
    "hyper",
    [dict(), dict(b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1), dict(weight_decay=0.0)],
    ids=["torch-defaults", "custom", "no-decay"],
)
def test_adamw_matches_torch_adamw_over_fifty_steps(hyper):
    lr = 1e-2
    params = make_params()
    ours, state = run_functional(adamw(lr, **hyper), params)
    torch_hyper = dict(betas=(hyper.get("b1", 0.9), hyper.get("b2", 0.999)), eps=hyper.get("eps", 1e-8),
                       weight_decay=hyper.get("weight_decay", 0.01))
    ref, opt, leaves = run_torch(lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True, **torch_hyper), params)
    assert_trees_close(ours, ref, **TOL)
    spec = optree.tree_structure(params)
    assert_trees_close(state.mu, optree.tree_unflatten(spec, [opt.state[p]["exp_avg"] for p in leaves]), **TOL)
    assert_trees_close(state.nu, optree.tree_unflatten(spec, [opt.state[p]["exp_avg_sq"] for p in leaves]), **TOL)
    assert int(state.count) == STEPS and state.count.dtype == torch.int64


def test_adamw_with_a_schedule_matches_torch_adamw_with_lambda_lr():
    peak = 2e-2
    schedule = warmup_cosine(peak, 10, 40, final=1e-3)
    params = make_params(3)
    ours, _ = run_functional(adamw(schedule, weight_decay=0.05), params)
    ref, _, _ = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=peak, weight_decay=0.05, foreach=True),
        params,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: float(schedule(s)) / peak),
    )
    assert_trees_close(ours, ref, **TOL)


@pytest.mark.parametrize("as_callable", [True, False], ids=["callable-mask", "tree-mask"])
def test_adamw_with_a_decay_mask_matches_torch_param_groups(as_callable):
    cfg = fm.ModelConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    params = fm.init_params(cfg, seed=0)
    mask = decay_mask if as_callable else decay_mask(params)
    ours, _ = run_functional(adamw(1e-2, weight_decay=0.3, mask=mask), params, steps=20)

    def make(leaves):
        flags = optree.tree_leaves(decay_mask(params))
        decay = [p for p, f in zip(leaves, flags) if f]
        no_decay = [p for p, f in zip(leaves, flags) if not f]
        groups = [{"params": decay, "weight_decay": 0.3}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, foreach=True)

    ref, _, _ = run_torch(make, params, steps=20)
    assert_trees_close(ours, ref, **TOL)
    # The mask matters: without it every leaf would decay and the result would differ.
    unmasked, _ = run_functional(adamw(1e-2, weight_decay=0.3), params, steps=20)
    with pytest.raises(AssertionError):
        assert_trees_close(unmasked, ref, **TOL)


def away_from_zero_params(seed):
    """Like make_params, with every |value| >= 1: no value moves by a factor of two in a step."""
    return optree.tree_map(lambda x: x.sign() * (1 + x.abs()), make_params(seed))


@pytest.mark.parametrize("masked", [False, True], ids=["all-decay", "masked"])
def test_adamw_steps_exactly_as_torch_fused_adamw_when_no_value_moves_by_a_factor_of_two(masked):
    params = away_from_zero_params(13)
    flags = optree.tree_map(lambda x: x.dim() >= 2, params) if masked else None
    ours, state = run_functional(adamw(1e-2, weight_decay=0.1, mask=flags), params, steps=20)
    assert_equals_torch_fused_adamw(ours, state, params, flags, steps=20)


def assert_equals_torch_fused_adamw(ours, state, params, flags, *, steps):
    """``ours`` and the moments in ``state`` are bit for bit those of ``torch.optim.AdamW(fused=True)``
    (lr 1e-2, weight decay 0.1 on the leaves ``flags`` selects, all of them for None) after ``steps``."""

    def make(leaves):
        keep = optree.tree_leaves(flags) if flags is not None else [True] * len(leaves)
        groups = [{"params": [p for p, k in zip(leaves, keep) if k], "weight_decay": 0.1},
                  {"params": [p for p, k in zip(leaves, keep) if not k], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, fused=True)

    ref, opt, leaves = run_torch(make, params, steps=steps)
    spec = optree.tree_structure(params)
    assert_trees_equal(ours, ref)
    assert_trees_equal(state.mu, optree.tree_unflatten(spec, [opt.state[p]["exp_avg"] for p in leaves]))
    assert_trees_equal(state.nu, optree.tree_unflatten(spec, [opt.state[p]["exp_avg_sq"] for p in leaves]))


def strided_grads(params, step):
    """random_grads with the dims of every matrix laid out in reverse: same values, not contiguous."""

    def relayout(x):
        rev = tuple(reversed(range(x.dim())))
        return x.permute(rev).contiguous().permute(rev)

    return optree.tree_map(relayout, random_grads(params, step))


def test_adamw_on_non_contiguous_gradients_takes_the_multi_tensor_route_and_matches_torch():
    params = make_params(17)
    g = strided_grads(params, 0)
    zw, zb = torch.zeros_like(params["w"]), torch.zeros_like(params["b"])
    assert not _fusable(g["w"], zw, zw, params["w"]) and _fusable(g["b"], zb, zb, params["b"])
    flags = {"w": True, "b": False, "scalar": False, "block": [{"k": True}, {"k": False}]}
    opt = adamw(1e-2, weight_decay=0.1, mask=flags)
    state, ours = opt.init(params), params
    for i in range(STEPS):
        updates, state = opt.update(strided_grads(params, i), state, ours)
        ours = apply_updates(ours, updates)

    def make(leaves):
        keep = optree.tree_leaves(flags)
        groups = [{"params": [p for p, k in zip(leaves, keep) if k], "weight_decay": 0.1},
                  {"params": [p for p, k in zip(leaves, keep) if not k], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, foreach=True)

    ref, _, _ = run_torch(make, params)
    assert_trees_close(ours, ref, **TOL)


def test_adamw_compiles_and_the_compiled_step_stays_close_to_eager():
    # The fused kernel's in-place writes cannot be functionalized: compiled code takes the foreach route.
    params, opt = make_params(19), adamw(1e-2, weight_decay=0.1)

    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return apply_updates(params, updates), state

    grads = random_grads(params, 0)
    eager = step(grads, opt.init(params), params)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(grads, opt.init(params), params)
    assert_trees_close(compiled, eager, **TOL)


def test_decay_mask_selects_exactly_the_linear_weights_of_the_model():
    cfg = fm.ModelConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    flat = fmtree.tree_flatten_with_paths(decay_mask(fm.init_params(cfg)))
    chosen = {k for k, v in flat.items() if v}
    expected = {
        f"h.{i}.{name}.weight" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert chosen == expected
    assert all(isinstance(v, bool) for v in flat.values())


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_matches_torch_sgd_over_fifty_steps(momentum, nesterov, weight_decay):
    params = make_params(5)
    ours, state = run_functional(sgd(0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), params)
    ref, opt, leaves = run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                   foreach=True),
        params,
    )
    assert_trees_close(ours, ref, **TOL)
    if momentum:
        spec = optree.tree_structure(params)
        bufs = optree.tree_unflatten(spec, [opt.state[p]["momentum_buffer"] for p in leaves])
        assert_trees_close(state.momentum, bufs, **TOL)
    else:
        assert state.momentum is None


def test_sgd_with_a_schedule_uses_the_rate_for_the_count_before_the_update():
    schedule = lambda count: 0.1 * (count + 1)  # noqa: E731
    params = {"w": torch.zeros(3)}
    opt = sgd(schedule)
    state = opt.init(params)
    for i in range(3):
        updates, state = opt.update({"w": torch.ones(3)}, state, params)
        assert_trees_close(updates, {"w": torch.full((3,), -0.1 * (i + 1))}, rtol=1e-6, atol=0.0)


@st.composite
def grad_trees(draw):
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=5))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e2]))
    g = torch.Generator().manual_seed(seed)
    return {f"leaf{i}": torch.randn(s, generator=g) * magnitude for i, s in enumerate(shapes)}


@given(grads=grad_trees(), max_norm=st.floats(1e-3, 1e3))
def test_clip_by_global_norm_equals_torch_clip_grad_norm(grads, max_norm):
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in optree.tree_leaves(grads)]
    for p, x in zip(params, optree.tree_leaves(grads)):
        p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    expected = optree.tree_unflatten(optree.tree_structure(grads), [p.grad for p in params])
    clip = clip_by_global_norm(max_norm)
    clipped, state = clip.update(grads, clip.init(None))
    assert_trees_equal(clipped, expected)
    assert state == EmptyState()


def test_clip_by_global_norm_leaves_small_gradients_unchanged_and_shrinks_large_ones():
    clip = clip_by_global_norm(1.0)
    small = {"a": torch.tensor([0.3, 0.4])}
    assert_trees_equal(clip.update(small, clip.init(None))[0], small)
    big, _ = clip.update({"a": torch.tensor([3.0, 4.0])}, clip.init(None))
    assert_trees_close(fmtree.tree_global_norm(big), torch.tensor(1.0), rtol=1e-6, atol=0.0)


def test_chain_of_clip_and_adamw_equals_applying_them_by_hand():
    params = make_params(7)
    clip, opt = clip_by_global_norm(0.5), adamw(1e-2)
    chained = chain(clip, opt)
    state = chained.init(params)
    s_clip, s_opt = clip.init(params), opt.init(params)
    for i in range(5):
        grads = random_grads(params, i)
        updates, state = chained.update(grads, state, params)
        by_hand, s_clip = clip.update(grads, s_clip, params)
        by_hand, s_opt = opt.update(by_hand, s_opt, params)
        assert_trees_equal(updates, by_hand)
        assert_trees_equal(state, (s_clip, s_opt))
        params = apply_updates(params, updates)


TRANSFORMS = {
    "adamw": lambda: adamw(1e-2, weight_decay=0.1),
    "adamw-mask-schedule": lambda: adamw(warmup_cosine(1e-2, 2, 6), weight_decay=0.1, mask=decay_mask),
    # Every combination of decay and layout: the two routes of each (see _adamw.py).
    "adamw-tree-mask": lambda: adamw(
        1e-2, weight_decay=0.1, mask={"w": False, "b": True, "scalar": False, "block": [{"k": True}, {"k": False}]}),
    "adamw-no-decay": lambda: adamw(1e-2, weight_decay=0.0),
    "sgd": lambda: sgd(0.1),
    "sgd-momentum-decay": lambda: sgd(0.1, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": lambda: sgd(warmup_cosine(0.1, 1, 5), momentum=0.9, nesterov=True),
    "clip": lambda: clip_by_global_norm(0.3),
    "chain": lambda: chain(clip_by_global_norm(1.0), adamw(1e-2)),
}


def _clone(tree):
    return optree.tree_map(torch.clone, tree)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_donated_updates_are_bit_identical_and_out_of_place_updates_touch_no_input(name, layout):
    opt = TRANSFORMS[name]()
    make_grads = random_grads if layout == "contiguous" else strided_grads
    assert isinstance(opt, GradientTransformation)
    params = make_params(11)
    state = opt.init(params)
    d_params, d_state = _clone(params), _clone(state)
    for i in range(4):
        grads = make_grads(params, i)
        kept = copy.deepcopy((grads, state, params))
        updates, state_next = opt.update(grads, state, params)
        new_params = apply_updates(params, updates)
        assert_trees_equal((grads, state, params), kept, msg="an out-of-place call mutated its inputs: ")

        d_grads = _clone(grads)
        d_updates, d_state_next = opt.update(d_grads, d_state, d_params, donate=True)
        d_new_params = apply_updates(d_params, d_updates, donate=True)
        assert_trees_equal(d_updates, updates)
        assert_trees_equal(d_state_next, state_next)
        assert_trees_equal(d_new_params, new_params)
        # Donation reuses the given tensors rather than allocating new ones.
        assert all(a is b for a, b in zip(optree.tree_leaves(d_new_params), optree.tree_leaves(d_params)))
        assert all(a is b for a, b in zip(optree.tree_leaves(d_state_next), optree.tree_leaves(d_state)))
        params, state, d_params, d_state = new_params, state_next, d_new_params, d_state_next


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-decay", "masked"])
def test_update_and_apply_steps_exactly_as_torch_fused_adamw_even_where_values_cross_zero(masked, donate):
    # Params near zero, which steps of 1e-2 move by more than a factor of two: there ``update`` then
    # ``apply_updates`` round once more than torch, and the fused kernel stepping the params does not.
    params = optree.tree_map(lambda x: x * 1e-3, make_params(13))
    flags = optree.tree_map(lambda x: x.dim() >= 2, params) if masked else None
    opt = adamw(1e-2, weight_decay=0.1, mask=flags)
    ours, state = _clone(params), opt.init(params)
    for i in range(20):
        ours, state = update_and_apply(opt, random_grads(params, i), state, ours, donate=donate)
    assert_equals_torch_fused_adamw(ours, state, params, flags, steps=20)


def _within_one_rounding(a, b, params):
    """|a - b| <= eps * (|params| + |a|) leaf by leaf: the update route rounds ``new - params`` and
    ``params + update`` once more than a step of the params themselves."""
    for x, y, p in zip(optree.tree_leaves(a), optree.tree_leaves(b), optree.tree_leaves(params)):
        bound = torch.finfo(x.dtype).eps * (p.abs() + x.abs())
        assert bool(((x - y).abs() <= bound).all()), ((x - y).abs().max(), bound.min())


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_update_and_apply_is_apply_updates_of_update_within_one_rounding_and_pure_unless_donated(name, layout):
    opt = TRANSFORMS[name]()
    make_grads = random_grads if layout == "contiguous" else strided_grads
    params = make_params(11)
    state = opt.init(params)
    for i in range(4):
        grads = make_grads(params, i)
        kept = copy.deepcopy((grads, state, params))
        new_params, new_state = update_and_apply(opt, grads, state, params)
        assert_trees_equal((grads, state, params), kept, msg="an out-of-place call mutated its inputs: ")
        updates, by_update = opt.update(grads, state, params)
        if opt.apply is None:  # no fused route: update_and_apply is that pair
            assert_trees_equal(new_params, apply_updates(params, updates))
        else:
            _within_one_rounding(new_params, apply_updates(params, updates), params)
        assert_trees_equal(new_state, by_update)

        d_params, d_state = _clone(params), _clone(state)
        d_new_params, d_new_state = update_and_apply(opt, _clone(grads), d_state, d_params, donate=True)
        assert_trees_equal((d_new_params, d_new_state), (new_params, new_state))
        assert all(a is b for a, b in zip(optree.tree_leaves(d_new_params), optree.tree_leaves(d_params)))
        assert all(a is b for a, b in zip(optree.tree_leaves(d_new_state), optree.tree_leaves(d_state)))
        params, state = new_params, new_state


def test_a_chain_applies_through_its_last_transform_only_when_that_one_can():
    params = make_params(7)
    clip, opt = clip_by_global_norm(0.5), adamw(1e-2)
    chained = chain(clip, opt)
    assert chained.apply is not None and chain(adamw(1e-2), clip).apply is None and chain(sgd(0.1)).apply is None
    state = chained.init(params)
    s_clip, s_opt = clip.init(params), opt.init(params)
    for i in range(3):
        grads = random_grads(params, i)
        new_params, state = update_and_apply(chained, grads, state, params)
        by_hand, s_clip = clip.update(grads, s_clip, params)
        by_hand, s_opt = opt.apply(by_hand, s_opt, params)
        assert_trees_equal(new_params, by_hand)
        assert_trees_equal(state, (s_clip, s_opt))
        params = new_params
    with pytest.raises(ValueError, match="chain: state has 1 entries for 2 transforms"):
        chained.apply(random_grads(params, 0), (s_clip,), params)
    with pytest.raises(ValueError, match="adamw: apply steps the params"):
        opt.apply(random_grads(params, 0), s_opt, None)


def test_apply_updates_keeps_the_params_dtype_in_both_modes():
    params = {"w": torch.randn(4, dtype=torch.bfloat16), "s": torch.randn((), dtype=torch.bfloat16)}
    updates = {"w": torch.randn(4), "s": torch.randn(())}
    out = apply_updates(params, updates)
    donated = apply_updates(_clone(params), updates, donate=True)
    assert_trees_equal(out, donated)
    assert out["w"].dtype == torch.bfloat16 and out["s"].dtype == torch.bfloat16


def test_apply_updates_rejects_trees_of_another_structure():
    with pytest.raises(ValueError, match="apply_updates"):
        apply_updates({"a": torch.ones(1)}, {"b": torch.ones(1)})


@pytest.mark.parametrize(
    "state",
    [
        ScaleByAdamState(torch.tensor(7), {"w": torch.full((2, 2), 0.5)}, {"w": torch.full((2, 2), 0.25)}),
        SgdState(torch.tensor(3), [torch.arange(3.0), {"x": torch.tensor(-1.0)}]),
        SgdState(torch.tensor(9), None),
        EmptyState(),
        (EmptyState(), ScaleByAdamState(torch.tensor(2), [torch.ones(1)], [torch.full((1,), 3.0)])),
    ],
    ids=["adam", "sgd-momentum", "sgd-plain", "empty", "chain"],
)
def test_every_state_type_round_trips_through_flatten_and_unflatten(state):
    leaves, spec = optree.tree_flatten(state)
    back = optree.tree_unflatten(spec, leaves)
    assert type(back) is type(state)
    assert_trees_equal(back, state)
    # The leaves really are the tensors: a changed leaf comes back changed.
    if leaves:
        changed = optree.tree_unflatten(spec, [x + 1 for x in leaves])
        with pytest.raises(AssertionError):
            assert_trees_equal(changed, state)


def test_optimizer_state_has_the_params_dtypes_and_an_int64_count():
    params = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3)}
    state = adamw(1e-3).init(params)
    assert state.count.dtype == torch.int64 and state.count.shape == ()
    assert state.mu["a"].dtype == torch.float64 and state.nu["b"].dtype == torch.float32


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: adamw(-1e-3), "learning_rate"),
        (lambda: adamw(1e-3, b1=1.0), "b1"),
        (lambda: adamw(1e-3, b1=-0.1), "b1"),
        (lambda: adamw(1e-3, b2=1.5), "b2"),
        (lambda: adamw(1e-3, eps=0.0), "eps"),
        (lambda: adamw(1e-3, weight_decay=-1.0), "weight_decay"),
        (lambda: sgd(-0.1), "learning_rate"),
        (lambda: sgd(0.1, momentum=-0.5), "momentum"),
        (lambda: sgd(0.1, nesterov=True), "nesterov"),
        (lambda: clip_by_global_norm(0.0), "max_norm"),
    ],
)
def test_bad_hyper_parameters_raise_value_error_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(b1=1.0), r"^adamw: b1 must be in \[0, 1\), got 1.0"),
        (dict(b2=-0.5), r"^adamw: b2 must be in \[0, 1\), got -0.5"),
        (dict(eps=0.0), r"^adamw: eps must be a finite number > 0, got 0.0"),
        (dict(weight_decay=-1.0), r"^adamw: weight_decay must be a finite number >= 0, got -1.0"),
    ],
)
def test_adamw_messages_name_the_function_the_argument_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adamw(1e-3, **kwargs)


def test_adamw_takes_the_ends_of_its_ranges_and_needs_no_params_without_decay():
    params = {"w": torch.ones(2)}
    for kwargs in (dict(b1=0.0), dict(b2=0.0), dict(weight_decay=0.0)):
        adamw(1e-3, **kwargs)
    opt = adamw(1e-3, weight_decay=0.0)
    updates, _ = opt.update({"w": torch.ones(2)}, opt.init(params))  # no params: nothing decays
    # lr * g / (|g| + eps): 1e-8 from -lr relative, plus a few float32 roundings.
    torch.testing.assert_close(updates["w"], torch.full((2,), -1e-3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("what", ["state.mu", "state.nu", "params"])
def test_adamw_names_the_tree_whose_structure_does_not_match(what):
    params, grads = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    opt = adamw(1e-3, weight_decay=0.1)
    state = opt.init(params)
    other = {"v": torch.ones(2)}
    if what == "params":
        args = (state, other)
    else:
        args = (state._replace(**{what.split(".")[1]: other}), params)
    with pytest.raises(ValueError, match=rf"^adamw: {what} must have the structure of the updates"):
        opt.update(grads, *args)


def test_adamw_mask_of_another_structure_names_adamw_and_the_mask():
    params = {"w": torch.ones(2)}
    opt = adamw(1e-3, mask={"v": True})
    with pytest.raises(ValueError, match=r"^adamw: mask must have the structure"):
        opt.update(params, opt.init(params), params)


def test_a_learning_rate_of_the_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match="learning_rate"):
        adamw("0.001")


def test_weight_decay_without_params_raises_value_error():
    opt = adamw(1e-3)
    with pytest.raises(ValueError, match="adamw: weight_decay"):
        opt.update({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}))


def test_a_mask_of_another_structure_raises_value_error():
    params = {"w": torch.ones(2)}
    opt = adamw(1e-3, mask={"v": True})
    with pytest.raises(ValueError, match="mask"):
        opt.update(params, opt.init(params), params)
