"""The public test kit: hypothesis strategies and tree-aware assertions.

Point these at your own loss function or training step to property-test that a memory technique
changed memory, not mathematics. The library's own property tests are written with them.

Example:
    >>> from hypothesis import given
    >>> from functional_memopt import testing
    >>> @given(testing.configs())
    ... def test_my_model(cfg): ...
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from ._config import ModelConfig
from ._data import Batch
from ._model import IGNORE_INDEX

try:  # hypothesis is needed for the strategies only, not for the assertions
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised only without the testing extra
    st = None

__all__ = [
    "assert_trees_close",
    "assert_trees_equal",
    "configs",
    "token_batches",
    "ragged_batches",
]


def _require_hypothesis() -> None:
    if st is None:
        raise ImportError(
            "functional_memopt.testing strategies need hypothesis; install with "
            "`pip install functional-memopt[testing]`."
        )


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 0.0, atol: float = 0.0, msg: str = "") -> None:
    """Assert two pytrees have the same structure, then leafwise equal within tolerances.

    Tolerances of zero mean bit-identical values (nan equal to nan). Non-tensor leaves must be
    equal. The error names the first differing leaf by its key path and the largest difference.
    """
    pa, la, sa = optree.tree_flatten_with_path(actual)
    pe, le, se = optree.tree_flatten_with_path(expected)
    if sa != se:
        raise AssertionError(f"{msg}tree structures differ:\n  actual:   {sa}\n  expected: {se}")
    for path, a, e in zip(pa, la, le):
        name = ".".join(map(str, path)) or "<root>"
        if isinstance(a, torch.Tensor) or isinstance(e, torch.Tensor):
            a_t, e_t = torch.as_tensor(a), torch.as_tensor(e)
            if a_t.shape != e_t.shape:
                raise AssertionError(f"{msg}leaf {name}: shapes differ, {tuple(a_t.shape)} vs {tuple(e_t.shape)}")
            if a_t.dtype != e_t.dtype:
                raise AssertionError(f"{msg}leaf {name}: dtypes differ, {a_t.dtype} vs {e_t.dtype}")
            if rtol == 0.0 and atol == 0.0:
                same = torch.equal(a_t, e_t) or (
                    a_t.is_floating_point()
                    and bool(((a_t == e_t) | (torch.isnan(a_t) & torch.isnan(e_t))).all())
                )
                if not same:
                    diff = (a_t.double() - e_t.double()).abs().nan_to_num(float("inf")).max().item()
                    raise AssertionError(f"{msg}leaf {name}: not bit-identical (max abs diff {diff:.3e})")
            else:
                try:
                    torch.testing.assert_close(a_t, e_t, rtol=rtol, atol=atol, equal_nan=True)
                except AssertionError as err:
                    raise AssertionError(f"{msg}leaf {name}: {err}") from None
        elif a != e:
            raise AssertionError(f"{msg}leaf {name}: {a!r} != {e!r}")


def assert_trees_equal(actual: Any, expected: Any, *, msg: str = "") -> None:
    """Assert two pytrees are bit-identical (same structure, dtypes, shapes and bits)."""
    assert_trees_close(actual, expected, rtol=0.0, atol=0.0, msg=msg)


# ----------------------------------------------------------------------------- strategies


def configs(*, max_layer: int = 2, max_head: int = 3, max_head_dim: int = 8, vocab_size: int | None = None,
            max_block: int = 16, bias: bool | None = None):
    """Small random ModelConfigs that run in milliseconds on a CPU."""
    _require_hypothesis()

    @st.composite
    def build(draw):
        n_head = draw(st.integers(1, max_head))
        head_dim = draw(st.integers(1, max_head_dim))
        return ModelConfig(
            vocab_size=vocab_size if vocab_size is not None else draw(st.integers(2, 48)),
            block_size=draw(st.integers(2, max_block)),
            n_layer=draw(st.integers(1, max_layer)),
            n_head=n_head,
            n_embd=n_head * head_dim,
            bias=draw(st.booleans()) if bias is None else bias,
            mlp_ratio=draw(st.integers(1, 4)),
        )

    return build()


def token_batches(cfg: ModelConfig, *, min_rows: int = 1, max_rows: int = 4, min_len: int = 1):
    """Full (unpadded) random Batches for ``cfg`` (tokens, targets, mask of ones)."""
    _require_hypothesis()

    @st.composite
    def build(draw):
        B = draw(st.integers(min_rows, max_rows))
        T = draw(st.integers(min(min_len, cfg.block_size), cfg.block_size))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        return Batch(tokens, targets, torch.ones(B, T))

    return build()


def ragged_batches(cfg: ModelConfig, *, min_rows: int = 1, max_rows: int = 4):
    """Right-padded Batches: each row has its own length >= 1; padding is masked and IGNORE_INDEX."""
    _require_hypothesis()

    @st.composite
    def build(draw):
        B = draw(st.integers(min_rows, max_rows))
        T = draw(st.integers(1, cfg.block_size))
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        targets = torch.where(real, targets, torch.full_like(targets, IGNORE_INDEX))
        return Batch(tokens, targets, real.to(torch.float32), real)

    return build()
