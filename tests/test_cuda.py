"""Checks that need a CUDA device (skipped elsewhere; run by benchmarks/gpu_check.sh)."""

import pytest
import torch

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.model.cce_loss import cce_available

pytestmark = pytest.mark.cuda

CFG = fm.ModelConfig(vocab_size=256, block_size=256, n_layer=2, n_head=4, n_embd=256)  # head_dim 64


def _batch(B=4, T=256, device="cuda"):
    return fm.sample_batch(fm.load_corpus(), B, T, seed=0, index=0, device=device)


def test_the_flash_kernel_serves_causal_attention_and_agrees_with_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = fm.init_params(CFG, seed=0, dtype=torch.bfloat16, device="cuda")
    tokens = _batch().tokens
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot serve this call
        flash = fm.apply(params, tokens, CFG)
    with sdpa_kernel([SDPBackend.MATH]):
        math = fm.apply(params, tokens, CFG)
    torch.testing.assert_close(flash.float(), math.float(), rtol=0.05, atol=0.05)


def test_padding_masks_run_on_the_memory_efficient_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = fm.init_params(CFG, seed=0, dtype=torch.bfloat16, device="cuda")
    batch = _batch()
    mask = torch.ones_like(batch.tokens, dtype=torch.bool)
    mask[:, 200:] = False
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        logits = fm.apply(params, batch.tokens, CFG, attention_mask=mask)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("policy", ["mixed_bf16", "mixed_fp16"])
def test_a_half_precision_cuda_step_tracks_the_fp32_cpu_step(policy):
    # SGD, not Adam: Adam's first step moves every param by about lr whatever the gradient (its sign
    # only), so a params tolerance that Adam can meet (2.1e-3 at lr 1e-3 before) passes a step that
    # moved the wrong way. SGD moves by lr * g, so the update's relative L2 error is the gradient's:
    # within GRAD_TOLERANCE_FACTOR epsilons of the compute dtype (testing/tolerances.py), plus the
    # float32 difference between the CUDA and CPU reductions (2 * GRAD_TOLERANCE_FACTOR eps32), and a
    # step that does not update at all has an error of 1. The loss: LOSS_TOLERANCE_FACTOR epsilons.
    opt = fm.sgd(0.1)
    params = fm.init_params(CFG, seed=0)
    ref_state = fm.init_train_state(params, opt)
    ref, ref_m = fm.make_train_step(CFG, opt, accum_steps=2)(ref_state, _batch(device="cpu"))
    # A scale that cannot overflow the head's float16 gradient (at most S * sqrt(n_embd) = 2**8 * 16).
    ls = fm.static_loss_scale(2.0**8, device="cuda") if policy == "mixed_fp16" else None
    state = fm.init_train_state(fmtree.tree_map(lambda x: x.cuda(), params), opt, loss_scale=ls)
    new, m = fm.make_train_step(CFG, opt, policy=policy, accum_steps=2)(state, _batch())
    assert not bool(m["skipped"])
    eps = torch.finfo(fm.get_policy(policy).compute_dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    loss_tol = testing.LOSS_TOLERANCE_FACTOR * eps + 2 * testing.LOSS_TOLERANCE_FACTOR * eps32
    assert abs(float(m["loss"]) - float(ref_m["loss"])) <= loss_tol * float(ref_m["loss"])
    update_tol = testing.GRAD_TOLERANCE_FACTOR * eps + 2 * testing.GRAD_TOLERANCE_FACTOR * eps32
    err = testing.update_error(fmtree.tree_map(lambda x: x.cpu(), new.params), ref.params, params)
    assert err <= update_tol, f"{policy}: the CUDA update differs from the CPU fp32 one by {err:.3e} > {update_tol:.3e}"


def test_remat_lowers_the_cuda_peak():
    opt = fm.sgd(0.1)
    peaks = {}
    for remat in (None, "all"):
        state = fm.init_train_state(fm.init_params(CFG, seed=0, device="cuda"), opt)
        step = fm.make_train_step(CFG, opt, remat=remat)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(state, _batch(B=8))
        torch.cuda.synchronize()
        peaks[remat] = torch.cuda.max_memory_allocated()
        del state, step
        torch.cuda.empty_cache()
    assert peaks["all"] < 0.8 * peaks[None]


def test_params_saved_from_cuda_load_back_on_cuda(tmp_path):
    params = fm.init_params(CFG, seed=0, device="cuda")
    fm.save_params(tmp_path / "p.safetensors", params, CFG, dtype=torch.bfloat16)
    loaded, cfg = fm.load_params(tmp_path / "p.safetensors", device="cuda")
    assert cfg == CFG and loaded["wte"].device.type == "cuda"
    testing.assert_trees_equal(loaded, fmtree.tree_cast(fmtree.tree_cast(params, torch.bfloat16), torch.float32))


@pytest.mark.skipif(not cce_available(), reason="the cut-cross-entropy package is not installed")
@pytest.mark.parametrize("policy", ["mixed_bf16", "mixed_fp16"])
def test_cut_cross_entropys_kernels_give_the_fp32_cpu_step(policy):
    # loss_chunk="cce" on CUDA: the same update as the fp32 CPU step within the half-precision
    # tolerance of the test above (the kernels' gradient filter is off).
    opt = fm.sgd(0.1)
    params = fm.init_params(CFG, seed=0)
    ref, _ = fm.make_train_step(CFG, opt, accum_steps=2)(fm.init_train_state(params, opt), _batch(device="cpu"))
    ls = fm.static_loss_scale(2.0**8, device="cuda") if policy == "mixed_fp16" else None
    state = fm.init_train_state(fmtree.tree_map(lambda x: x.cuda(), params), opt, loss_scale=ls)
    step = fm.make_train_step(CFG, opt, policy=policy, accum_steps=2, loss_chunk="cce")
    new, m = step(state, _batch())
    assert not bool(m["skipped"])
    eps, eps32 = torch.finfo(fm.get_policy(policy).compute_dtype).eps, torch.finfo(torch.float32).eps
    update_tol = testing.GRAD_TOLERANCE_FACTOR * eps + 2 * testing.GRAD_TOLERANCE_FACTOR * eps32
    err = testing.update_error(fmtree.tree_map(lambda x: x.cpu(), new.params), ref.params, params)
    assert err <= update_tol, f"cce {policy}: the CUDA update differs from the CPU fp32 one by {err:.3e}"
