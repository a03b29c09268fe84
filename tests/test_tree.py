import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt._tree import tree_paths


def _tree(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g).to(dtype), "b": [torch.randn(5, generator=g).to(dtype), {"c": torch.randn(2, generator=g).to(dtype)}],
            "i": torch.arange(3)}


def test_cast_touches_only_floating_leaves():
    t = fmtree.tree_cast(_tree(), torch.float16)
    assert t["a"].dtype == torch.float16 and t["i"].dtype == torch.int64


@given(st.integers(0, 1000), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_global_norm_equals_the_norm_of_all_leaves_concatenated(seed, dtype):
    t = _tree(seed, dtype)
    flat = torch.cat([t["a"].flatten(), t["b"][0], t["b"][1]["c"]]).double()
    torch.testing.assert_close(fmtree.tree_global_norm(t).double(), flat.norm(), rtol=1e-6, atol=1e-6)
    assert fmtree.tree_global_norm(t).dtype == torch.float32


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_all_finite_detects_any_nonfinite_value(bad):
    t = _tree()
    assert bool(fmtree.tree_all_finite(t))
    t["b"][1]["c"] = t["b"][1]["c"].clone()
    t["b"][1]["c"][1] = bad
    assert not bool(fmtree.tree_all_finite(t))


def test_bytes_counts_each_leaf_once():
    t = _tree()
    assert fmtree.tree_bytes(t) == (12 + 5 + 2) * 4 + 3 * 8
    shared = torch.zeros(10)
    assert fmtree.tree_bytes({"x": shared, "y": shared}) == 40


def test_paths_round_trip_and_mismatches_are_listed():
    t = _tree()
    flat = fmtree.tree_flatten_with_paths(t)
    assert list(flat) == tree_paths(t) == ["a", "b.0", "b.1.c", "i"]
    testing.assert_trees_equal(fmtree.tree_unflatten_from_paths(flat, t), t)
    flat.pop("a")
    flat["z"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['a'\], unexpected \['z'\]"):
        fmtree.tree_unflatten_from_paths(flat, t)


def test_assert_trees_close_reports_the_differing_leaf():
    x = _tree()
    y = fmtree.tree_map(torch.clone, x)
    y["b"][1]["c"] = y["b"][1]["c"] + 1
    with pytest.raises(AssertionError, match=r"b\.1\.c"):
        testing.assert_trees_equal(x, y)
    with pytest.raises(AssertionError, match="structures differ"):
        testing.assert_trees_equal(x, {"a": x["a"]})


def test_from_paths_inverts_flatten_with_paths_for_params():
    import functional_memopt as fm

    params = fm.init_params(fm.ModelConfig(n_layer=2, n_embd=8, n_head=2, bias=False), seed=3)
    testing.assert_trees_equal(fmtree.tree_from_paths(fmtree.tree_flatten_with_paths(params)), params)


def test_a_cast_with_nothing_to_cast_returns_the_tree_itself_and_otherwise_casts_only_what_differs():
    from functional_memopt.train.loss_scale import NoOpLossScale

    tree = {"a": torch.ones(2), "b": [torch.zeros(3), torch.arange(3)]}
    assert fmtree.tree_cast(tree, torch.float32) is tree  # the step casts every step: no new containers
    assert NoOpLossScale().unscale(tree) is tree
    mixed = {"a": torch.ones(2), "b": [torch.zeros(3, dtype=torch.bfloat16), torch.arange(3)]}
    out = fmtree.tree_cast(mixed, torch.float32)
    assert out is not mixed and out["b"][0].dtype == torch.float32
    assert out["a"] is mixed["a"] and out["b"][1] is mixed["b"][1]  # leaves already right are not copied
    widened = NoOpLossScale().unscale(mixed)
    assert widened is not mixed and widened["b"][0].dtype == torch.float32 and widened["a"] is mixed["a"]
