import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt.model.attention import positions_from_segments
from functional_memopt.model.attention import attention_kernel, build_attention_mask
from functional_memopt import _tree as fmtree
from functional_memopt import testing


def _separate_qkv_attention(x, c_attn, c_proj, n_head, mask):
    """Reference: three projections, heads split by view/transpose, explicit softmax."""
    B, T, C = x.shape
    w_q, w_k, w_v = c_attn["weight"].split(C, dim=0)
    b = c_attn.get("bias")
    b_q, b_k, b_v = b.split(C) if b is not None else (None, None, None)
    hs = C // n_head

    def heads(t):
        return t.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)

    q, k, v = heads(F.linear(x, w_q, b_q)), heads(F.linear(x, w_k, b_k)), heads(F.linear(x, w_v, b_v))
    att = (q @ k.transpose(-2, -1)) / hs**0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return F.linear(y, c_proj["weight"], c_proj.get("bias"))


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@given(testing.configs(max_block=10), st.data(), st.booleans())
def test_fused_qkv_equals_three_separate_projections(kernel, cfg, data, padded):
    params = fmtree.tree_cast(fm.init_params(cfg, seed=data.draw(st.integers(0, 99))), torch.float64)
    attn = params["h"][0]["attn"]
    if cfg.bias:
        attn = fmtree.tree_map(lambda t: t + 0.1 * torch.randn_like(t), attn)  # nonzero biases
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, cfg.block_size))
    x = torch.randn(B, T, cfg.n_embd, dtype=torch.float64)
    mask = None
    if padded:
        lengths = torch.tensor(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
        mask = build_attention_mask(T, attention_mask=torch.arange(T)[None] < lengths[:, None])
    got = fm.causal_attention(x, attn["c_attn"], attn["c_proj"], cfg.n_head, mask=mask, kernel=kernel)
    want = _separate_qkv_attention(x, attn["c_attn"], attn["c_proj"], cfg.n_head, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@given(testing.configs(max_block=10, max_layer=1), st.integers(0, 2**16), st.booleans())
def test_both_kernels_give_one_model_its_gradients_included(cfg, seed, padded):
    # float64: the kernels differ only in the order of their sums, so 1e-10 holds them to one function.
    params = fmtree.tree_cast(fm.init_params(cfg, seed=seed), torch.float64)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=g)
    am = None
    if padded:
        am = (torch.arange(cfg.block_size)[None] < torch.randint(1, cfg.block_size + 1, (2, 1), generator=g)).long()

    def grads(kernel):
        c = dataclasses.replace(cfg, attention=kernel)
        loss = lambda p: fm.apply(p, tokens, c, attention_mask=am).logsumexp(-1).sum()  # noqa: E731
        return torch.func.grad_and_value(loss)(params)

    (g_sdpa, v_sdpa), (g_math, v_math) = grads("sdpa"), grads("math")
    torch.testing.assert_close(v_math, v_sdpa, rtol=1e-10, atol=1e-10)
    for a, b in zip(fmtree.tree_leaves(g_math), fmtree.tree_leaves(g_sdpa)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True])
def test_the_math_kernel_in_bfloat16_is_within_its_rounding_of_exact_attention(masked):
    # Inputs are bfloat16 values; the truth is their attention in float64. The math kernel rounds
    # the scores to bfloat16 twice (matmul, scaled add: |ds| <= eps |s|), which moves softmax's
    # probabilities by at most 2 |ds| relative, so the output by 2 eps max|s| max|v|; the
    # probabilities' and the output's own roundings add eps/2 max|v| each. Bound: eps max|v| (1 + 2 max|s|).
    g = torch.Generator().manual_seed(0)
    B, h, T, d = 2, 3, 48, 16
    q, k, v = (torch.randn(B, h, T, d, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = None
    if masked:
        mask = build_attention_mask(T, attention_mask=(torch.arange(T)[None] < torch.tensor([[T], [T // 2]])).long())
    from functional_memopt.model.attention import _math_attention

    got = _math_attention(q, k, v, mask).double()
    q64, k64, v64 = q.double(), k.double(), v.double()
    s = (q64 @ k64.transpose(-1, -2)) / d**0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
    want = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v64
    eps = torch.finfo(torch.bfloat16).eps
    bound = eps * v64.abs().max() * (1 + 2 * s.masked_fill(~allowed, 0).abs().max())
    err = (got - want).abs().max()
    assert err <= bound, (err, bound)
    assert err > bound / 1000  # the bound is not vacuous: the kernel did round in bfloat16


def test_auto_picks_the_math_kernel_for_short_bfloat16_sequences_on_the_cpu_only():
    bf16, fp32, fp16 = torch.bfloat16, torch.float32, torch.float16
    assert attention_kernel("auto", 128, 32, bf16, "cpu") == "math"
    assert attention_kernel("auto", 1, 32, bf16, "cpu") == "math"
    assert attention_kernel("auto", 129, 32, bf16, "cpu") == "sdpa"  # past 4 x the head width
    assert attention_kernel("auto", 256, 64, bf16, "cpu") == "math"
    assert attention_kernel("auto", 128, 32, fp32, "cpu") == "sdpa"  # not faster in float32 (benchmark)
    assert attention_kernel("auto", 128, 32, fp16, "cpu") == "sdpa"  # nor in float16
    assert attention_kernel("auto", 128, 32, bf16, "cuda") == "sdpa"  # flash on CUDA
    assert attention_kernel("auto", 128, 32, bf16, torch.device("cuda", 0)) == "sdpa"
    assert attention_kernel("sdpa", 128, 32, bf16, "cpu") == "sdpa"
    assert attention_kernel("math", 4096, 32, fp32, "cuda") == "math"
    with pytest.raises(ValueError, match="kernel must be one of"):
        attention_kernel("flash", 128, 32, bf16, "cpu")


def test_an_unknown_attention_kernel_is_refused_with_the_accepted_names():
    with pytest.raises(ValueError, match=r"attention must be one of \('auto', 'sdpa', 'math'\)"):
        fm.ModelConfig(attention="flash")


def test_causal_only_builds_no_mask_tensor():
    assert build_attention_mask(1024) is None


def test_padding_mask_allows_causal_real_keys_and_the_diagonal():
    m = build_attention_mask(4, attention_mask=torch.tensor([[1, 1, 0, 0]]))
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert m.shape == (1, 1, 4, 4) and torch.equal(m[0, 0], want)


def test_document_mask_blocks_attention_across_documents_and_positions_restart():
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    m = build_attention_mask(5, segment_ids=seg)[0, 0]
    assert not m[2, 1] and m[4, 2] and m[1, 0] and not m[0, 1]
    assert positions_from_segments(seg).tolist() == [[0, 1, 0, 1, 2]]
    assert positions_from_segments(torch.tensor([[3, 3, 3, 7]])).tolist() == [[0, 1, 2, 0]]


def test_positions_are_made_on_the_device_of_the_segment_ids():
    # The meta device stands in for an accelerator: its tensors hold no data, but an op that mixes
    # them with CPU tensors fails, as one mixing CUDA and CPU tensors would.
    pos = positions_from_segments(torch.zeros(2, 5, dtype=torch.long, device="meta"))
    assert pos.device.type == "meta" and pos.shape == (2, 5) and pos.dtype == torch.int64


def test_fully_padded_row_gives_finite_logits():
    cfg = fm.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=7)
    logits = fm.apply(fm.init_params(cfg), torch.zeros(2, 4, dtype=torch.long), cfg,
                      attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]]))
    assert torch.isfinite(logits).all()


@given(testing.configs(max_layer=2, max_block=8, min_head_dim=4), st.integers(0, 2**16))
def test_a_key_mask_anywhere_gives_the_reference_module_logits(cfg, seed):
    # Padding at the end of a row is invisible to causal attention anyway; keys masked before a
    # query are not, so the mask must reach every block. The reference builds its own mask.
    # Tolerance: two float32 forwards that sum in different orders (tests/test_config_fields.py).
    from functional_memopt.testing.reference import ReferenceGPT

    g = torch.Generator().manual_seed(seed)
    params = fm.init_params(cfg, seed=seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=g)
    keys = torch.rand(2, cfg.block_size, generator=g) < 0.6
    ours = fm.apply(params, tokens, cfg, attention_mask=keys)
    theirs = ReferenceGPT.from_params(params, cfg)(tokens, attention_mask=keys).detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
