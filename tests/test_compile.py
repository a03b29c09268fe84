"""make_train_step(compile=...): the differentiated loss compiled, everything around it eager.

The fast tests use dynamo with the "aot_eager" family of backends: the same graph capture and
AOTAutograd forward / backward split as inductor, then ATen kernels, so results are bit-identical
to the eager step (where the model's functions trace as they run: GPT-2's GELU traces in another,
equal form for the CPU, see model/gpt.py). The inductor tests (marked slow: a cold inductor cache spends ~40 s compiling
the fp32 graph of even a one-block model on two CPU cores, ~4 s when warm) check the
generated kernels against eager within the library's eps-derived tolerances.
"""

import dataclasses

import optree
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import functional_memopt as fm
from functional_memopt import adamw, dynamic_loss_scale, init_train_state, make_train_step
from functional_memopt.testing import GRAD_TOLERANCE_FACTOR, LOSS_TOLERANCE_FACTOR, relative_error, tolerance

from _saved import saved_tensor_bytes

CFG = fm.ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
LR = 1e-3


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _batch(seed, B=8, T=16, poison=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T)
    if poison:  # a nan loss weight in the last micro-batch: the token count, the factor (S / count)
        mask[B - 1, 0] = float("nan")  # and the gradients are nan, and the step is skipped
    return fm.Batch(tokens, targets, mask)


def _state(policy, opt, scale=2.0**10, growth_interval=1):
    params = fm.init_params(CFG, seed=1)
    return init_train_state(params, opt, policy=policy,
                            loss_scale=dynamic_loss_scale(scale, growth_interval=growth_interval))


def _leaves(tree):
    return [x for x in optree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("policy", ["fp32", "mixed_bf16"])  # mixed_bf16: the math attention kernel on the CPU
def test_five_steps_with_a_changing_loss_scale_and_a_skipped_step_compile_once(policy):
    opt = adamw(fm.warmup_cosine(LR, 2, 10), weight_decay=0.01)
    counter = CompileCounterWithBackend("aot_eager")
    step = make_train_step(CFG, opt, policy=policy, accum_steps=4, max_grad_norm=1.0, compile={"backend": counter})
    state = _state(policy, opt, growth_interval=1)  # the scale doubles after every finite step
    scales, skipped = [], []
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        for i in range(5):
            state, m = step(state, _batch(i, poison=i == 2))
            scales.append(float(m["loss_scale"]))
            skipped.append(bool(m["skipped"]))
    assert skipped == [False, False, True, False, False]
    assert scales == [2.0**10, 2.0**11, 2.0**12, 2.0**11, 2.0**12]
    assert int(state.step) == 4
    # One graph captured and compiled (forward and backward together) for 5 steps x 4 micro-batches.
    assert counter.frame_count == 1
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("policy", ["fp32", "mixed_bf16"])
def test_compiled_step_with_aten_kernels_is_bitwise_the_eager_step(policy):
    # With the erf GELU: GPT-2's is traced as x * sigmoid(2u) for the CPU, equal within rounding
    # (tests/test_activation.py bounds it), so its compiled step is not bitwise the eager one.
    cfg = dataclasses.replace(CFG, activation="gelu")
    opt = adamw(LR, weight_decay=0.01)
    eager = make_train_step(cfg, opt, policy=policy, accum_steps=4, max_grad_norm=1.0)
    compiled = make_train_step(cfg, opt, policy=policy, accum_steps=4, max_grad_norm=1.0,
                               compile={"backend": "aot_eager"})
    se = sc = _state(policy, opt)
    for i in range(3):
        se, me = eager(se, _batch(i, poison=i == 1))
        sc, mc = compiled(sc, _batch(i, poison=i == 1))
        for k in me:
            assert torch.equal(mc[k], me[k]) or (mc[k].isnan() & me[k].isnan()).all(), k
    assert int(sc.step) == 2
    for a, b in zip(_leaves(sc), _leaves(se), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fp32", "mixed_bf16"])
def test_inductor_step_matches_the_eager_step_within_eps_tolerances(policy):
    cfg = fm.ModelConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)
    opt = adamw(LR, weight_decay=0.01)
    state = init_train_state(fm.init_params(cfg, seed=1), opt, policy=policy, loss_scale=dynamic_loss_scale(2.0**10))
    eager = make_train_step(cfg, opt, policy=policy, accum_steps=4, max_grad_norm=1.0)
    compiled = make_train_step(cfg, opt, policy=policy, accum_steps=4, max_grad_norm=1.0, compile=True)
    batch = _batch(0)
    se, me = eager(state, batch)
    sc, mc = compiled(state, batch)
    dtype = fm.get_policy(policy).compute_dtype
    loss_tol, grad_tol = tolerance(dtype, factor=LOSS_TOLERANCE_FACTOR), tolerance(dtype, factor=GRAD_TOLERANCE_FACTOR)
    # Inductor generates its own pointwise and reduction kernels (fused, reordered sums, vectorised
    # exp / tanh; under bf16 a fused chain stays in float32 between loads and stores) while
    # matmuls and attention stay ATen calls: the same bounds as a reduced-precision run.
    torch.testing.assert_close(mc["loss"], me["loss"], rtol=loss_tol, atol=0)
    torch.testing.assert_close(mc["grad_norm"], me["grad_norm"], rtol=grad_tol, atol=0)
    assert torch.equal(mc["tokens"], me["tokens"]) and not bool(mc["skipped"])
    # AdamW's first moment after one update is 0.1 * grad: the gradients' relative L2 error.
    assert relative_error(sc.opt_state.mu, se.opt_state.mu) <= grad_tol
    assert relative_error(sc.opt_state.nu, se.opt_state.nu) <= 2 * grad_tol
    # The first Adam update is lr * g / (|g| + eps): an element whose gradient is ~0 may flip its
    # sign between the two, so the params agree to 2 lr elementwise and no closer in general.
    for a, b in zip(_leaves(sc.params), _leaves(se.params), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2.01 * LR)


def _saved_bytes(step, state, batch):
    total, (new, _) = saved_tensor_bytes(lambda: step(state, batch))
    return total, new


def test_remat_under_compile_recomputes_in_the_compiled_backward():
    # aot_eager_decomp_partition partitions forward and backward with inductor's min-cut
    # partitioner: traced as is, _Remat's recompute would be merged back into the forward there.
    opt = adamw(LR)
    backend = {"backend": "aot_eager_decomp_partition"}
    state = _state("fp32", opt)
    batch = _batch(0, B=8, T=16)
    kept, grads = {}, {}
    for remat in (None, "all"):
        step = make_train_step(CFG, opt, accum_steps=2, remat=remat, compile=backend)
        kept[remat], new = _saved_bytes(step, state, batch)
        grads[remat] = new.opt_state.mu
        eager_new, _ = make_train_step(CFG, opt, accum_steps=2, remat=remat)(state, batch)
        assert relative_error(new.opt_state.mu, eager_new.opt_state.mu) <= tolerance(torch.float32, factor=8)
    assert kept["all"] < 0.5 * kept[None]
    assert relative_error(grads["all"], grads[None]) <= tolerance(torch.float32, factor=8)


def test_every_step_has_its_own_compile_cache():
    # Dynamo caches per code object: without a fresh copy per make_train_step, the ninth config in a
    # process would hit the recompile limit (an error under fullgraph=True, eager otherwise).
    for i in range(9):
        cfg = fm.ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8 + 2 * i)
        opt = adamw(LR)
        step = make_train_step(cfg, opt, compile={"backend": "eager"})
        batch = fm.Batch(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
        step(init_train_state(fm.init_params(cfg), opt), batch)
    assert counters["stats"]["unique_graphs"] == 9


def test_compile_needs_the_autograd_engine_and_a_bool_or_options():
    opt = adamw(LR)
    with pytest.raises(ValueError, match="engine='autograd'"):
        make_train_step(CFG, opt, engine="func", compile=True)
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        make_train_step(CFG, opt, compile="inductor")


@pytest.mark.parametrize(
    "device,policy,steps,flag,expected",
    [
        ("cpu", "mixed_bf16", 1000, "auto", True),  # a long bf16 run pays its compile back
        ("cpu", "mixed_bf16", 999, "auto", False),
        ("cpu", "fp32", 5000, "auto", False),  # fp32 on the CPU gains too little
        ("cuda", "fp32", 10, "auto", True),
        ("cpu", "fp32", 10, "on", True),
        ("cuda", "mixed_bf16", 5000, "off", False),
    ],
)
def test_memopt_train_compile_auto_compiles_where_it_was_measured_to_pay(device, policy, steps, flag, expected):
    from functional_memopt.app.run import TrainArgs, resolve_args

    args = TrainArgs(policy=policy, steps=steps, compile=flag)
    assert resolve_args(args, torch.device(device))[1].compile is expected
