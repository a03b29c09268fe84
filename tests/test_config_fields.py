"""Non-default config fields reach the math: layer_norm_eps, mlp_ratio and bias=False.

Against Hugging Face's GPT-2 where it has the field (layer_norm_epsilon, n_inner), and against the
imperative reference module (nn.LayerNorm, nn.Linear with bias=False) where it has not: GPT-2
always has biases. Both are independent of the functional model's code.

Tolerance: two float32 implementations of one forward differ only in the order of their sums. A
dot product over a fan-in of m terms is exact to m * eps32 relative to the sum of the terms'
magnitudes, and the widest sum here is the MLP's (mlp_ratio * n_embd <= 4 * 24 = 96 terms): about
1e-5 for the logits of order 1 these weights give, the tolerance test_gpt2.py holds as well. A
layer-norm epsilon drawn in [1e-3, 1] against features of variance ~0.5 changes the normalised
features by eps / (2 var) >= 1e-3 relative: a hundred times the tolerance. Widths of 4 and more,
as for every tolerance here (testing/tolerances.py): layer norm over 1 or 2 features divides the
rounding by their spread, which can be near zero.
"""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.testing.reference import ReferenceGPT

from _hf_reference import hf_logits, make_hf_gpt2, params_from_hf

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-5, atol=1e-5)
epsilons = st.floats(1e-3, 1.0)


def _tokens(cfg, seed, rows=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=g)
    lengths = torch.randint(1, cfg.block_size + 1, (rows,), generator=g)
    return tokens, (torch.arange(cfg.block_size)[None] < lengths[:, None]).long()


@given(testing.configs(bias=True, max_layer=2, max_block=8, min_head_dim=4), epsilons, st.integers(0, 2**16))
def test_layer_norm_eps_and_mlp_ratio_give_hugging_face_gpt2_logits(cfg, eps, seed):
    cfg = dataclasses.replace(cfg, layer_norm_eps=eps)  # mlp_ratio is drawn by configs(): GPT-2's n_inner
    model = make_hf_gpt2(cfg, seed, scale=0.5)
    assert model.config.layer_norm_epsilon == eps
    assert model.transformer.h[0].mlp.c_fc.weight.shape[1] == cfg.mlp_ratio * cfg.n_embd
    params = params_from_hf(model)
    tokens, mask = _tokens(cfg, seed)
    torch.testing.assert_close(fm.apply(params, tokens, cfg), hf_logits(model, tokens), **TOL)
    real = mask.bool()
    torch.testing.assert_close(fm.apply(params, tokens, cfg, attention_mask=mask)[real],
                               hf_logits(model, tokens, mask)[real], **TOL)


@given(testing.configs(max_layer=2, max_block=8, min_head_dim=4), epsilons, st.integers(0, 2**16))
def test_bias_free_models_with_any_eps_and_mlp_ratio_give_the_reference_module_logits_and_gradients(cfg, eps, seed):
    cfg = dataclasses.replace(cfg, layer_norm_eps=eps)
    g = torch.Generator().manual_seed(seed)
    # Random layer norms and larger weights: init's ones and 0.02 would hide a dropped term.
    params = fmtree.tree_map(lambda p: torch.randn(p.shape, generator=g) * 0.5, fm.init_params(cfg, seed=seed))
    model = ReferenceGPT.from_params(params, cfg)
    if not cfg.bias:
        assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    tokens, mask = _tokens(cfg, seed)
    ours = fm.apply(params, tokens, cfg, attention_mask=mask)
    theirs = model(tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real].detach(), **TOL)
    # The gradients of the same loss through both: every field reaches the backward too.
    targets = torch.where(real, torch.roll(tokens, -1, 1), fm.IGNORE_INDEX)
    s, c = fm.loss_fn(params, tokens, targets, cfg, attention_mask=mask)
    grads = torch.func.grad(lambda p: fm.loss_fn(p, tokens, targets, cfg, attention_mask=mask)[0] / c)(params)
    loss = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), targets.flatten(), ignore_index=fm.IGNORE_INDEX)
    loss.backward()
    ref_grads = model.tree({n: p.grad for n, p in model.named_parameters()})
    # Two float32 runs, each within GRAD_TOLERANCE_FACTOR epsilons of the exact gradient.
    assert testing.relative_error(grads, ref_grads) <= 2 * testing.GRAD_TOLERANCE_FACTOR * torch.finfo(torch.float32).eps
    torch.testing.assert_close(s / c, loss.detach(), **TOL)


def test_a_bias_free_config_has_no_bias_leaves_and_the_reference_none_either():
    cfg = fm.ModelConfig(vocab_size=16, block_size=4, n_layer=1, n_head=1, n_embd=4, bias=False, mlp_ratio=3)
    params = fm.init_params(cfg)
    assert not [p for p in fmtree.tree_paths(params) if p.endswith("bias")]
    model = ReferenceGPT.from_params(params, cfg)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert params["h"][0]["mlp"]["c_fc"]["weight"].shape == (12, 4)

