import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from functional_memopt import ModelConfig, init_params, loss_fn, testing
from functional_memopt.testing import GRAD_TOLERANCE_FACTOR, LOSS_TOLERANCE_FACTOR, relative_error, tolerance
from functional_memopt.train.precision import Policy, get_policy, with_policy
from functional_memopt.testing import assert_trees_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ALIASES = {
    torch.float32: ["float32", "fp32", "f32"],
    torch.float16: ["float16", "fp16", "half"],
    torch.bfloat16: ["bfloat16", "bf16"],
    torch.float64: ["float64", "fp64"],
}
dtypes = st.sampled_from(DTYPES)


@given(dtypes, dtypes, dtypes)
def test_a_policy_survives_the_round_trip_through_its_string(param, compute, output):
    policy = Policy(param, compute, output)
    assert get_policy(str(policy)) == policy


@given(st.permutations(["params", "compute", "output"]), dtypes, dtypes, dtypes, st.data())
def test_the_long_form_is_read_in_any_order_with_any_dtype_alias(order, param, compute, output, data):
    chosen = {"params": param, "compute": compute, "output": output}
    parts = [f"{key}={data.draw(st.sampled_from(ALIASES[chosen[key]]))}" for key in order]
    assert get_policy(",".join(parts)) == Policy(param, compute, output)


def test_the_string_form_names_params_compute_and_output():
    assert str(Policy(torch.float32, torch.bfloat16, torch.float32)) == "params=float32,compute=bfloat16,output=float32"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fp32", (torch.float32,) * 3),
        ("bf16", (torch.bfloat16,) * 3),
        ("fp16", (torch.float16,) * 3),
        ("mixed_fp16", (torch.float32, torch.float16, torch.float32)),
        ("mixed_bf16", (torch.float32, torch.bfloat16, torch.float32)),
        (" Mixed_BF16 ", (torch.float32, torch.bfloat16, torch.float32)),
        ("half", (torch.float16,) * 3),
        ("c=bf16", (torch.float32, torch.bfloat16, torch.float32)),
        ("p=f16, c=f16, o=f32", (torch.float16, torch.float16, torch.float32)),
    ],
)
def test_short_forms_and_abbreviations_give_the_documented_dtypes(spec, expected):
    assert get_policy(spec) == Policy(*expected)


def test_a_policy_is_returned_as_is():
    policy = Policy(torch.float32, torch.float16, torch.float32)
    assert get_policy(policy) is policy


@pytest.mark.parametrize(
    "spec",
    ["", "fp8", "mixed", "params=float32,compute=int8", "params=float32,weights=bf16", "params=f32,params=bf16",
     "params=float32;compute=bf16", "compute bf16"],
)
def test_bad_strings_raise_a_value_error_listing_what_is_expected(spec):
    with pytest.raises(ValueError, match=r"^get_policy: .*mixed_bf16"):
        get_policy(spec)


def test_a_policy_with_a_non_float_dtype_or_spec_is_a_type_error():
    with pytest.raises(TypeError, match="^Policy: compute_dtype"):
        Policy(torch.float32, torch.int8, torch.float32)
    with pytest.raises(TypeError, match="^get_policy"):
        get_policy(torch.float32)


def test_casts_change_only_floating_leaves():
    policy = get_policy("params=f32,compute=bf16,output=f16")
    tree = {"w": torch.randn(3), "i": torch.arange(3), "b": torch.tensor([True]),
            "n": [torch.randn(2, dtype=torch.float64)]}
    for cast, dtype in ((policy.cast_to_param, torch.float32), (policy.cast_to_compute, torch.bfloat16),
                        (policy.cast_to_output, torch.float16)):
        out = cast(tree)
        assert out["w"].dtype == dtype and out["n"][0].dtype == dtype
        assert out["i"] is tree["i"] and out["b"] is tree["b"]
        assert_trees_equal(out["w"], tree["w"].to(dtype))


def test_a_policy_is_one_opaque_leaf_to_optree():
    assert optree.tree_leaves({"p": get_policy("mixed_bf16")}) == [get_policy("mixed_bf16")]


@pytest.mark.parametrize("mode", ["cast", "autocast"])
@pytest.mark.parametrize("spec", ["mixed_bf16", "mixed_fp16"])
def test_gradients_of_float32_master_params_come_back_in_float32(spec, mode):
    params = {"w": torch.randn(4, 3), "b": torch.randn(4)}
    x = torch.randn(5, 3)

    def f(p, x):
        return torch.tanh(F.linear(x, p["w"], p["b"])).sum()

    grads, value = torch.func.grad_and_value(with_policy(f, spec, mode=mode))(params, x)
    assert all(g.dtype == torch.float32 for g in optree.tree_leaves(grads))
    assert value.dtype == torch.float32
    assert relative_error(grads, torch.func.grad(f)(params, x)) <= tolerance(get_policy(spec).compute_dtype, factor=8)


def test_cast_mode_runs_every_op_in_the_compute_dtype_and_autocast_mode_only_the_listed_ones():
    seen = {}

    def f(p, x):
        seen["input"] = x.dtype
        seen["linear"] = F.linear(x, p["w"]).dtype
        seen["norm"] = F.layer_norm(p["w"], (3,)).dtype
        return p["w"].sum()

    params, x = {"w": torch.ones(4, 3)}, torch.ones(2, 3)
    with_policy(f, "mixed_bf16", mode="cast")(params, x)
    assert seen == {"input": torch.bfloat16, "linear": torch.bfloat16, "norm": torch.bfloat16}
    with_policy(f, "mixed_bf16", mode="autocast")(params, x)
    assert seen == {"input": torch.float32, "linear": torch.bfloat16, "norm": torch.float32}


def test_cast_inputs_false_leaves_floating_arguments_alone():
    seen = {}

    def f(p, x, *, w):
        seen.update(x=x.dtype, w=w.dtype, p=p.dtype)
        return p.sum()

    with_policy(f, "mixed_fp16")(torch.ones(2), torch.ones(2), w=torch.ones(2))
    assert seen == {"x": torch.float16, "w": torch.float16, "p": torch.float16}
    with_policy(f, "mixed_fp16", cast_inputs=False)(torch.ones(2), torch.ones(2), w=torch.ones(2))
    assert seen == {"x": torch.float32, "w": torch.float32, "p": torch.float16}


def test_a_pure_bfloat16_policy_keeps_bfloat16_gradients_and_outputs():
    params = {"w": torch.randn(4, 3, dtype=torch.bfloat16)}
    grads, value = torch.func.grad_and_value(with_policy(lambda p: (p["w"] * p["w"]).sum(), "bf16"))(params)
    assert grads["w"].dtype == torch.bfloat16 and value.dtype == torch.bfloat16


def test_with_policy_casts_floating_outputs_and_leaves_integer_outputs_alone():
    f = with_policy(lambda p: (p.sum(), p.sum().long(), (p * 2,)), "params=f32,compute=bf16,output=f16")
    out = f(torch.ones(3))
    assert [o.dtype for o in optree.tree_leaves(out)] == [torch.float16, torch.int64, torch.float16]


def test_with_policy_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="^with_policy: mode"):
        with_policy(lambda p: p, "fp32", mode="fast")


def test_tolerance_is_a_multiple_of_the_dtype_epsilon():
    assert tolerance(torch.bfloat16, factor=8) == 8 * 2.0**-7
    assert tolerance(torch.float16, factor=1) == 2.0**-10
    with pytest.raises(ValueError, match="^tolerance"):
        tolerance(torch.float32, factor=0)


def test_relative_error_is_the_l2_error_over_the_whole_tree():
    a = {"x": torch.tensor([3.0]), "y": torch.tensor([4.0]), "i": torch.tensor([1])}
    b = {"x": torch.tensor([3.0]), "y": torch.tensor([4.0 + 0.5]), "i": torch.tensor([1])}
    assert relative_error(b, a) == pytest.approx(0.1)
    assert relative_error(a, a) == 0.0


# A relative error needs a gradient that is not mostly cancellation (see the tolerance factors):
# vocabularies of 16 and more, widths of 4 and more, at least 2 rows of 4 tokens.
model_configs = st.builds(
    lambda n_head, head_dim, **kw: ModelConfig(n_head=n_head, n_embd=n_head * head_dim, **kw),
    n_head=st.integers(1, 2), head_dim=st.integers(4, 8), n_layer=st.integers(1, 2), vocab_size=st.integers(16, 48),
    block_size=st.integers(4, 16), bias=st.booleans(), mlp_ratio=st.integers(1, 4),
)


@given(st.data(), st.sampled_from(["mixed_bf16", "mixed_fp16"]), st.sampled_from(["cast", "autocast"]))
def test_the_model_loss_and_gradients_under_a_mixed_policy_stay_within_epsilon_tolerances_of_float32(data, spec, mode):
    cfg = data.draw(model_configs)
    batch = data.draw(testing.token_batches(cfg, min_rows=2, min_len=4))
    params = init_params(cfg, seed=data.draw(st.integers(0, 2**16)))

    def f(p):
        return loss_fn(p, batch.tokens, batch.targets, cfg, mask=batch.mask)

    (ref_grads, (ref_loss, ref_count)) = torch.func.grad_and_value(f, has_aux=True)(params)
    grads, (loss, count) = torch.func.grad_and_value(with_policy(f, spec, mode=mode), has_aux=True)(params)
    dtype = get_policy(spec).compute_dtype
    assert count.item() == ref_count.item()
    assert abs(loss.item() - ref_loss.item()) <= tolerance(dtype, factor=LOSS_TOLERANCE_FACTOR) * abs(ref_loss.item())
    assert relative_error(grads, ref_grads) <= tolerance(dtype, factor=GRAD_TOLERANCE_FACTOR)
    assert all(g.dtype == torch.float32 for g in optree.tree_leaves(grads))


def _model_problem():
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, 64, (4, 32), generator=g), torch.randint(0, 64, (4, 32), generator=g)
    return cfg, init_params(cfg, seed=0), tokens, targets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_under_func_grad_gives_the_gradients_of_the_imperative_autocast_recipe_bitwise(dtype):
    # Autocast rules cover forward ops only (functorch issue 305); backward ops run in the dtypes
    # of the forward tensors they consume, which is what the autograd recipe does too.
    cfg, params, tokens, targets = _model_problem()
    policy = Policy(torch.float32, dtype, torch.float32)
    grads = torch.func.grad(lambda p: with_policy(loss_fn, policy, mode="autocast")(p, tokens, targets, cfg)[0])(params)
    leaves = optree.tree_map(lambda x: x.detach().clone().requires_grad_(), params)
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(leaves, tokens, targets, cfg)[0]
    expected = torch.autograd.grad(loss, optree.tree_leaves(leaves))
    assert_trees_equal(optree.tree_leaves(grads), list(expected))


def test_autocast_and_cast_modes_agree_with_each_other_within_tolerance():
    cfg, params, tokens, targets = _model_problem()
    def loss(p, mode):
        return with_policy(loss_fn, "mixed_bf16", mode=mode)(p, tokens, targets, cfg)[0]

    grads = {mode: torch.func.grad(loss)(params, mode) for mode in ("cast", "autocast")}
    tol = tolerance(torch.bfloat16, factor=2 * GRAD_TOLERANCE_FACTOR)
    assert relative_error(grads["cast"], grads["autocast"]) <= tol


def test_autocast_mode_finds_the_device_past_non_tensor_leaves_and_defaults_to_the_cpu():
    # The device is that of the first floating leaf: a Python number before it is skipped, and a
    # tree with no floating leaf at all runs under the CPU's autocast.
    f = with_policy(lambda p, x: (p["b"] * x).sum() * p["a"], "mixed_bf16", mode="autocast")
    assert f({"a": 3, "b": torch.ones(2)}, torch.ones(2)).dtype == torch.float32
    seen = {}

    def g(p, x):
        seen["dtype"] = F.linear(x, x).dtype  # lowered only if the CPU's autocast is on
        return x.sum()

    with_policy(g, "mixed_bf16", mode="autocast")({"i": torch.arange(3)}, torch.ones(2, 2))
    assert seen["dtype"] == torch.bfloat16
