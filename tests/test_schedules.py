import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_memopt.optim.schedules import constant_schedule, cosine_decay, linear_warmup, warmup_cosine


def _cos(peak, final, frac):
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize(
    "schedule,points",
    [
        (constant_schedule(0.3), {0: 0.3, 5: 0.3, 10**6: 0.3}),
        (linear_warmup(2.0, 4), {0: 0.0, 1: 0.5, 3: 1.5, 4: 2.0, 100: 2.0}),
        (linear_warmup(2.0, 0), {0: 2.0, 7: 2.0}),
        (cosine_decay(1.0, 10, final=0.1), {0: 1.0, 3: _cos(1.0, 0.1, 0.3), 10: 0.1, 50: 0.1}),
        (cosine_decay(1.0, 0), {0: 0.0, 3: 0.0}),
        (
            warmup_cosine(1.0, 4, 14, final=0.2),
            {0: 0.0, 2: 0.5, 4: 1.0, 6: _cos(1.0, 0.2, 0.2), 14: 0.2, 99: 0.2},
        ),
        (warmup_cosine(1.0, 0, 10), {0: 1.0, 5: _cos(1.0, 0.0, 0.5), 10: 0.0}),
        (warmup_cosine(1.0, 5, 5, final=0.3), {0: 0.0, 4: 0.8, 5: 0.3, 9: 0.3}),
    ],
    ids=["constant", "warmup", "warmup-zero", "cosine", "cosine-zero", "warmup-cosine", "no-warmup", "no-decay"],
)
def test_schedules_equal_their_formulas_for_int_and_tensor_counts(schedule, points):
    for count, expected in points.items():
        assert schedule(count) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        value = schedule(torch.tensor(count))
        got = value.item() if isinstance(value, torch.Tensor) else value
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
        if isinstance(value, torch.Tensor):
            assert value.shape == () and value.dtype == torch.float64


@given(
    peak=st.floats(1e-5, 10.0),
    warmup=st.integers(1, 1000),
    extra=st.integers(1, 1000),
    final_frac=st.floats(0.0, 1.0),
)
def test_warmup_cosine_is_continuous_where_warmup_ends(peak, warmup, extra, final_frac):
    schedule = warmup_cosine(peak, warmup, warmup + extra, final=peak * final_frac)
    slope = max(peak / warmup, (peak - peak * final_frac) * math.pi / (2 * extra))
    left, at, right = schedule(warmup - 1), schedule(warmup), schedule(warmup + 1)
    assert at == pytest.approx(peak, rel=1e-12)
    assert abs(at - left) <= slope * (1 + 1e-9) and abs(right - at) <= slope * (1 + 1e-9)
    # The tensor path takes the same branch at the boundary.
    assert schedule(torch.tensor(warmup)).item() == pytest.approx(peak, rel=1e-12)


@given(peak=st.floats(1e-5, 10.0), warmup=st.integers(0, 50), extra=st.integers(0, 50), count=st.integers(0, 200))
def test_warmup_cosine_stays_between_zero_and_peak(peak, warmup, extra, count):
    value = warmup_cosine(peak, warmup, warmup + extra)(count)
    assert 0.0 <= value <= peak * (1 + 1e-12)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: linear_warmup(1.0, -1), "warmup_steps"),
        (lambda: linear_warmup(1.0, 2.5), "warmup_steps"),
        (lambda: cosine_decay(1.0, -3), "decay_steps"),
        (lambda: cosine_decay(-1.0, 3), "peak"),
        (lambda: cosine_decay(1.0, 3, final=-0.1), "final"),
        (lambda: warmup_cosine(1.0, 10, 5), "warmup_steps"),
        (lambda: warmup_cosine(1.0, -1, 5), "warmup_steps"),
        (lambda: warmup_cosine(1.0, 0, -5), "total_steps"),
        (lambda: constant_schedule(float("nan")), "value"),
    ],
)
def test_bad_schedule_arguments_raise_value_error_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()
