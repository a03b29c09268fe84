"""``loss_chunk="cce"``: the cut-cross-entropy package behind the chunked loss's setting.

Its CUDA kernels need a GPU (tests/test_cuda.py). Here: every refusal says what to do instead,
the ledger models the route, and, where the package is installed, its reference implementation
(``impl="torch_compile"``, which runs on the CPU) checks the wiring: the token-weighted sum with
fractional masks, IGNORE_INDEX and padding, and a whole training step against the plain loss's.
"""
from __future__ import annotations

import functools

import pytest
import torch

import functional_memopt as fm
import functional_memopt.testing  # noqa: F401  (fm.testing below)
from functional_memopt.model import cce_loss, gpt
from functional_memopt.memory.ledger import choose_loss_chunk
from functional_memopt.model.cce_loss import cce_available, cce_loss_bytes, cce_token_loss
from functional_memopt.model.chunked_loss import HeadGradSink
from test_chunked_loss import assert_within, float32_bounds, loss_and_grads, make_case, plain

CFG = fm.ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
needs_cce = pytest.mark.skipif(not cce_available(), reason="the cut-cross-entropy package is not installed")


@pytest.fixture
def installed(monkeypatch):
    """As if the package were installed: the refusals below come before any import of it."""
    monkeypatch.setattr(cce_loss, "cce_available", lambda: True)


def test_without_the_package_the_step_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(cce_loss, "cce_available", lambda: False)
    with pytest.raises(ImportError, match="pip install cut-cross-entropy.*or pass an integer loss_chunk"):
        fm.make_train_step(CFG, fm.sgd(0.1), policy="mixed_bf16", loss_chunk="cce")


@pytest.mark.parametrize("kw, match", [
    (dict(policy="fp32"), "needs a half compute dtype.*got torch.float32"),
    (dict(policy="mixed_bf16", engine="func"), "needs engine='autograd'"),
    (dict(policy="mixed_bf16", compile=True), "turn compile off"),
    (dict(policy="mixed_bf16", policy_mode="autocast"), "needs policy_mode='cast'"),
])
def test_a_setting_the_kernels_cannot_run_under_is_refused_naming_it(installed, kw, match):
    with pytest.raises(ValueError, match=match):
        fm.make_train_step(CFG, fm.sgd(0.1), loss_chunk="cce", **kw)


def test_features_off_cuda_are_refused_naming_the_device(installed):
    x, w = torch.randn(1, 3, 4, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA kernels, but the features are on cpu"):
        cce_token_loss(x, w, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="head_grad needs the chunked loss"):
        params = fm.init_params(CFG)
        sink = HeadGradSink(torch.zeros_like(params["wte"]), torch.ones(()))
        gpt.loss_fn(params, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), CFG,
                    loss_chunk="cce", head_grad=sink)


def test_the_ledger_models_the_route_and_refuses_it_off_cuda():
    cfg = fm.get_config("gpt2")
    kw = dict(batch_size=8, seq_len=1024, policy="mixed_bf16", accum_steps=4, remat="all", donate=True)
    cce = fm.predict_memory(cfg, device="cuda", loss_chunk="cce", **kw)
    sink = fm.predict_memory(cfg, device="cuda", loss_chunk=choose_loss_chunk(cfg, 2048), **kw)
    n, V, C = 2 * 1024, cfg.vocab_size, cfg.n_embd
    assert cce.logits == cce_loss_bytes(n, V, C, compute_bytes=2)["peak"] >= (n + V) * C * 2
    # The kernels hand back a (V, C) head gradient in bf16 that waits for wte's cast and is then
    # cast to float32 beside the embedding's table: more than the sink's route.
    assert cce.total > sink.total
    with pytest.raises(ValueError, match="runs on CUDA with a half compute dtype"):
        fm.predict_memory(cfg, device="cpu", loss_chunk="cce", **kw)
    with pytest.raises(ValueError, match="runs on CUDA with a half compute dtype"):
        fm.predict_memory(cfg, device="cuda", loss_chunk="cce", **{**kw, "policy": "fp32"})


@needs_cce
@pytest.mark.parametrize("seed", [0, 1])
def test_the_packages_loss_is_the_token_weighted_sum_with_masks_ignored_and_padded_tokens(seed):
    # float32, fractional mask, IGNORE_INDEX and padded tails: the loss and both gradients within
    # the float32 error bounds of the chunked loss's tests (same three computations).
    x, w, t, m = make_case(seed, 3, 7, 8, 29, torch.float32, p_ignore=0.2, p_mask=0.3)
    m = m * torch.rand(m.shape, generator=torch.Generator().manual_seed(seed))  # fractional weights
    got = loss_and_grads(functools.partial(cce_token_loss, impl="torch_compile"), x, w, t, m)
    want = loss_and_grads(plain, x, w, t, m)
    assert got[1].item() == pytest.approx(want[1].item(), rel=1e-6)
    tol_l, tol_gx, tol_gw = float32_bounds(x, w, t, m)
    assert_within(got[0], want[0], tol_l, "loss_sum")
    assert_within(got[2], want[2], tol_gx, "grad_x")
    assert_within(got[3], want[3], tol_gw, "grad_weight")


@needs_cce
def test_a_step_through_the_package_matches_the_plain_step(monkeypatch):
    # Through the model and the step under mixed bf16: the tied wte gets both its gradients
    # (the head's back from the package's function, the embedding's), masks count.
    monkeypatch.setattr(gpt, "cce_token_loss", functools.partial(cce_token_loss, impl="torch_compile"))
    batch = fm.pad_sequences([list(range(1, 12)), list(range(5, 20)), [3, 4, 5]], 16)
    opt = fm.sgd(0.1)
    state = fm.init_train_state(fm.init_params(CFG, seed=1), opt, policy="mixed_bf16")
    a, ma = fm.make_train_step(CFG, opt, policy="mixed_bf16", accum_steps=2)(state, batch)
    b, mb = fm.make_train_step(CFG, opt, policy="mixed_bf16", accum_steps=2, loss_chunk="cce")(state, batch)
    eps = torch.finfo(torch.bfloat16).eps
    # As for the chunked loss's step test: gradients within a few bf16 eps (|grad| < 1), lr 0.1.
    fm.testing.assert_trees_close(b.params, a.params, rtol=0, atol=0.1 * 8 * eps)
    assert float(mb["tokens"]) == float(ma["tokens"]) == float(batch.mask.sum())
    torch.testing.assert_close(mb["loss"], ma["loss"], rtol=4 * eps, atol=0)
    moved = (b.params["wte"] - state.params["wte"]).abs().amax()
    assert moved > 0.1 * 8 * eps  # the comparison above is not vacuous


@pytest.mark.parametrize("x, w, t, match", [
    (torch.randn(1, 3, 4), torch.randn(5, 6), torch.zeros(1, 3, dtype=torch.long), "weight \\(V, C\\) with the same C"),
    (torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 2, dtype=torch.long),
     "targets must have shape \\(1, 3\\)"),
    (torch.randn(1, 3, 4), torch.randn(5, 4).double(), torch.zeros(1, 3, dtype=torch.long), "share one dtype"),
])
def test_inputs_of_the_wrong_shape_or_dtype_are_refused_naming_them(x, w, t, match):
    with pytest.raises(ValueError, match="cce_token_loss: .*" + match):
        cce_token_loss(x, w, t, impl="torch_compile")
