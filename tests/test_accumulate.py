import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_memopt import testing
from functional_memopt.train.accumulate import accumulate_gradients, accumulate_in_place, accumulator_dtype

from _hypothesis import examples


def _grad_fn(p, x):
    loss_sum = (p["w"] * x).sum()
    return (loss_sum, (loss_sum, torch.tensor(float(x.numel())))), {"w": x.sum(0).to(p["w"].dtype)}


@examples(50)
@given(st.integers(1, 6), st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
def test_fold_sums_gradients_losses_and_counts_in_a_wide_accumulator(k, dtype):
    p = {"w": torch.ones(3, dtype=dtype)}
    parts = [torch.full((2, 3), float(i + 1), dtype=dtype) for i in range(k)]
    acc = accumulate_gradients(_grad_fn, p, iter(parts))
    assert acc.grads["w"].dtype == accumulator_dtype(dtype)
    want = sum(x.double().sum(0) for x in parts)
    torch.testing.assert_close(acc.grads["w"].double(), want)
    assert float(acc.count) == 6.0 * k


def test_half_gradients_do_not_overflow_in_the_fp32_accumulator():
    p = {"w": torch.ones(1, dtype=torch.float16)}
    parts = [torch.full((1, 1), 60000.0, dtype=torch.float16)] * 4
    acc = accumulate_gradients(_grad_fn, p, parts)
    assert float(acc.grads["w"]) == 240000.0


def test_fold_leaves_params_and_micro_batches_untouched_and_rejects_empty_input():
    p = {"w": torch.ones(3)}
    parts = [torch.ones(2, 3), torch.ones(2, 3)]
    before = [x.clone() for x in parts]
    accumulate_gradients(_grad_fn, p, parts)
    testing.assert_trees_equal(parts, before)
    testing.assert_trees_equal(p, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="no micro-batches"):
        accumulate_gradients(_grad_fn, p, [])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_loss_sums_and_counts_are_summed_in_float32(dtype):
    # 3 micro-batches of 1000 tokens: 3000 is not a bfloat16 number, and 3 * 60000 overflows float16.
    def grad_fn(p, x):
        loss = torch.tensor(60000.0 if dtype == torch.float16 else 1001.0, dtype=dtype)
        return (loss, (loss, torch.tensor(1000.0, dtype=dtype))), {"w": x}

    acc = accumulate_gradients(grad_fn, {"w": torch.ones(1)}, [torch.ones(1)] * 3)
    assert acc.loss_sum.dtype == acc.count.dtype == torch.float32
    assert float(acc.count) == 3000.0
    assert float(acc.loss_sum) == 3 * (60000.0 if dtype == torch.float16 else 1000.0)  # bf16(1001) == 1000


@pytest.mark.parametrize("engine", ["autograd", "func"])
def test_a_gradient_tensor_shared_by_two_leaves_is_summed_once_per_micro_batch(engine):
    # d/da and d/db of ((a + b) * x).sum() are one tensor (AddBackward hands the same one to both
    # inputs); summed over two micro-batches each leaf must get x1 + x2, not a leaf's sum added twice.
    import functional_memopt as fm

    params = {"a": torch.zeros(3), "b": torch.zeros(3)}
    xs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]

    def loss(p, x):
        s = ((p["a"] + p["b"]) * x).sum()
        return s, (s.detach(), torch.tensor(1.0))

    grad_fn = fm.value_and_grad(loss, has_aux=True, engine=engine)
    acc = accumulate_gradients(grad_fn, params, xs)
    assert torch.equal(acc.grads["a"], xs[0] + xs[1]) and torch.equal(acc.grads["b"], xs[0] + xs[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_in_place_fold_refuses_half_leaves_which_need_a_float32_sum(dtype):
    def fn(p, x):
        loss_sum = (p["w"].float() * x).sum() + (p["b"] * x).sum()
        return loss_sum, (loss_sum.detach(), torch.tensor(float(x.numel())))

    params = {"w": torch.ones(3, dtype=dtype), "b": torch.ones(3), "steps": torch.zeros((), dtype=torch.int64)}
    with pytest.raises(ValueError, match=rf"^accumulate_in_place: leaves of dtype \['{dtype}'\] need a wider sum"):
        accumulate_in_place(fn, params, [torch.ones(3)])
