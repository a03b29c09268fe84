import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt.model.remat import remat_layers
from functional_memopt import _tree as fmtree
from functional_memopt import testing

from _saved import saved_tensor_bytes


@given(testing.configs(max_layer=3), st.data(), st.sampled_from(["all", 1, 2, [0]]))
def test_remat_gives_the_same_gradients_as_no_remat(cfg, data, spec):
    params = fm.init_params(cfg, seed=0)
    batch = data.draw(testing.ragged_batches(cfg))

    def loss(p, remat):
        s, c = fm.loss_fn(p, batch.tokens, batch.targets, cfg, mask=batch.mask,
                          attention_mask=batch.attention_mask, remat=remat)
        return s / c.clamp(min=1)

    plain = torch.func.grad_and_value(lambda p: loss(p, None))(params)
    spec = [i for i in spec if i < cfg.n_layer] if isinstance(spec, list) else spec
    remat = torch.func.grad_and_value(lambda p: loss(p, spec))(params)
    testing.assert_trees_close(remat, plain, rtol=1e-6, atol=1e-6)


def _saved_bytes(cfg, remat):
    params = fmtree.tree_map(lambda t: t.requires_grad_(), fm.init_params(cfg, seed=0))
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=torch.Generator().manual_seed(0))
    total, (s, c) = saved_tensor_bytes(lambda: fm.loss_fn(params, tokens, tokens, cfg, remat=remat))
    torch.autograd.grad(s, fmtree.tree_map(lambda t: t, list(fmtree.tree_flatten_with_paths(params).values())))
    return total


def test_remat_saves_activation_memory_in_proportion_to_the_blocks_chosen():
    cfg = fm.ModelConfig(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=64)
    none, every_2nd, every = (_saved_bytes(cfg, r) for r in (None, 2, "all"))
    assert every < every_2nd < none
    # Each rematerialised block keeps its input and its weights instead of every activation.
    assert every < 0.5 * none


def test_bad_remat_spec_is_rejected():
    with pytest.raises(ValueError, match="unknown spec"):
        remat_layers("some", 4)
    with pytest.raises(ValueError, match="out of range"):
        remat_layers([5], 4)
    with pytest.raises(ValueError, match=">= 1"):
        remat_layers(0, 4)


def _recomputed_blocks(cfg, remat):
    """The blocks whose forward runs twice (once more in backward): the ones actually rematerialised."""
    from functional_memopt.model import gpt

    calls = {}
    plain = gpt.block_apply

    def storage(t):  # the recompute runs under torch.func.vjp, on wrappers of the saved leaves
        while torch._C._functorch.is_functorch_wrapped_tensor(t):
            t = torch._C._functorch.get_unwrapped(t)
        return t.data_ptr()

    def counting(block, x, **kw):
        key = storage(block["ln_1"]["weight"])
        calls[key] = calls.get(key, 0) + 1
        return plain(block, x, **kw)

    params = fmtree.tree_map(lambda t: t.requires_grad_(), fm.init_params(cfg, seed=0))
    tokens = torch.zeros(1, 2, dtype=torch.long)
    gpt.block_apply = counting
    try:
        s, _ = fm.loss_fn(params, tokens, tokens, cfg, remat=remat)
        torch.autograd.grad(s, [b["ln_1"]["weight"] for b in params["h"]])
    finally:
        gpt.block_apply = plain
    return {i for i, b in enumerate(params["h"]) if calls[b["ln_1"]["weight"].data_ptr()] == 2}


@given(st.integers(1, 7), st.integers(1, 8))
def test_remat_every_n_recomputes_blocks_0_n_2n_and_no_others(n_layer, n):
    cfg = fm.ModelConfig(vocab_size=8, block_size=4, n_layer=n_layer, n_head=1, n_embd=4)
    expected = {i for i in range(n_layer) if i % n == 0}  # 0, n, 2n, ... : block 0 always
    assert _recomputed_blocks(cfg, n) == expected
    assert _recomputed_blocks(cfg, str(n)) == expected
    assert sorted(remat_layers(n, n_layer)) == sorted(expected)


@given(st.integers(1, 5), st.integers(1, 6))
def test_saved_activation_bytes_follow_the_blocks_that_every_n_chooses(n_layer, n):
    # The blocks have equal shapes, so each rematerialised block saves the same fixed amount less
    # (its activations, keeping its input and weights): the saved bytes are a function of how
    # many blocks 0, n, 2n, ... there are, and remat=n saves what the explicit list saves.
    cfg = fm.ModelConfig(vocab_size=8, block_size=4, n_layer=n_layer, n_head=1, n_embd=4)
    chosen = [i for i in range(n_layer) if i % n == 0]
    none, first = _saved_bytes(cfg, None), _saved_bytes(cfg, [0])
    assert _saved_bytes(cfg, n) == _saved_bytes(cfg, chosen) == none - len(chosen) * (none - first)
