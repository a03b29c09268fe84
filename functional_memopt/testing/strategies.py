"""Hypothesis strategies: small random configs, params, batches (full and ragged), policies.

Example:
    >>> from hypothesis import given
    >>> from functional_memopt.testing import configs
    >>> @given(configs())
    ... def test_my_model(cfg): ...
"""

from __future__ import annotations

import torch

from ..data.batch import IGNORE_INDEX, Batch
from ..model.config import ModelConfig
from ..model.layout import init_params

try:  # hypothesis is needed for the strategies only, not for the assertions
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised only without the testing extra
    st = None

__all__ = ["configs", "params", "token_batches", "ragged_batches", "masked_batches", "policies", "nonfinite_values",
           "accumulation_steps", "powers_of_two"]


def _require_hypothesis() -> None:
    if st is None:
        raise ImportError(
            "functional_memopt.testing strategies need hypothesis; install with "
            "`pip install functional-memopt[testing]`."
        )


def configs(*, max_layer: int = 2, max_head: int = 3, min_head_dim: int = 1, max_head_dim: int = 8,
            vocab_size: int | None = None, max_block: int = 16, bias: bool | None = None):
    """Small random ModelConfigs that run in milliseconds on a CPU.

    Widths down to 1 are drawn by default: they catch shape bugs. Precision tests want
    ``min_head_dim >= 4``: at width 1 or 2 layer norm cancels most of the signal and a fp32
    reference gradient is itself mostly rounding.
    """
    _require_hypothesis()

    @st.composite
    def build(draw):
        n_head = draw(st.integers(1, max_head))
        head_dim = draw(st.integers(min_head_dim, max(min_head_dim, max_head_dim)))
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


def masked_batches(cfg: ModelConfig, *, min_rows: int = 1, max_rows: int = 4, min_len: int = 1):
    """Right-padded Batches with a 0/1 loss mask that leaves out some real targets too.

    Each row has its own length (padding: IGNORE_INDEX targets, mask 0, attention_mask False), and
    the mask is also 0 on drawn real positions whose targets are *not* IGNORE_INDEX, as a prompt
    mask or a completion-only loss makes. At least one target is counted, and at least one real
    target is masked whenever the batch has two or more positions, so token counts are ragged
    across rows and micro-batches, and mask and IGNORE_INDEX can be told apart.
    """
    _require_hypothesis()

    @st.composite
    def build(draw):
        B = draw(st.integers(min_rows, max_rows))
        T = draw(st.integers(min(min_len, cfg.block_size), cfg.block_size))
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        if B == 1 and T >= 2:
            lengths[0] = max(lengths[0], 2)  # room for one counted and one masked target
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        keep = torch.rand(B, T, generator=g) < draw(st.floats(0.3, 0.9))
        flat = real.flatten().nonzero().flatten()
        keep.view(-1)[flat[0]] = True  # one counted target at least
        if len(flat) > 1:
            keep.view(-1)[flat[-1]] = False  # one real target masked at least
        targets = torch.where(real, targets, torch.full_like(targets, IGNORE_INDEX))
        return Batch(tokens, targets, (real & keep).to(torch.float32), real)

    return build()


def powers_of_two(lo: int = -4, hi: int = 24):
    """Loss scales 2**e for e in [lo, hi]: multiplying by them is exact in binary floating point."""
    _require_hypothesis()
    return st.integers(lo, hi).map(lambda e: 2.0**e)


def params(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32):
    """Freshly initialised params for ``cfg`` with a drawn seed."""
    _require_hypothesis()
    return st.integers(0, 2**31 - 1).map(lambda seed: init_params(cfg, seed=seed, dtype=dtype))


def policies(*, reduced_only: bool = False):
    """Precision policy strings: fp32 and the mixed / pure half-precision short forms."""
    _require_hypothesis()
    names = ["mixed_bf16", "mixed_fp16", "bf16", "fp16"] + ([] if reduced_only else ["fp32"])
    return st.sampled_from(names)


def nonfinite_values():
    """inf, -inf or nan, to inject into a loss or a gradient."""
    _require_hypothesis()
    return st.sampled_from([float("inf"), float("-inf"), float("nan")])


def accumulation_steps(batch_size: int):
    """Accumulation step counts from 1 to ``batch_size`` (dividing it or not)."""
    _require_hypothesis()
    return st.integers(1, max(1, batch_size))
