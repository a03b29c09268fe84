import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import testing
from functional_memopt.train.grad import value_and_grad


def _f(p, x):
    return (torch.tanh(x @ p["w"]) * p["b"]).sum() + 0 * p["unused"].sum()


@given(st.integers(0, 1000))
def test_both_engines_return_value_then_grads_equal_to_torch_func(seed):
    g = torch.Generator().manual_seed(seed)
    p = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "unused": torch.randn(2, generator=g)}
    x = torch.randn(5, 3, generator=g)
    want_grads, want_value = torch.func.grad_and_value(_f)(p, x)
    for engine in ("func", "autograd"):
        value, grads = value_and_grad(_f, engine=engine)(p, x)
        torch.testing.assert_close(value, want_value, rtol=0, atol=0)
        testing.assert_trees_close(grads, want_grads, rtol=1e-6, atol=1e-7)
        assert not value.requires_grad


def test_has_aux_and_integer_leaves():
    p = {"w": torch.tensor([2.0]), "n": torch.tensor([3])}
    for engine in ("func", "autograd"):
        (value, aux), grads = value_and_grad(lambda p: ((p["w"] ** 2).sum(), p["w"] * 10), has_aux=True, engine=engine)(p)
        assert float(value) == 4.0 and float(aux) == 20.0 and float(grads["w"]) == 4.0
        assert not aux.requires_grad


def test_autograd_engine_leaves_the_callers_leaves_untouched():
    p = {"w": torch.randn(3)}
    value_and_grad(lambda p: p["w"].sum(), engine="autograd")(p)
    assert not p["w"].requires_grad and p["w"].grad is None


def test_unknown_engine_is_rejected():
    with pytest.raises(ValueError, match="engine must be one of"):
        value_and_grad(_f, engine="jax")
