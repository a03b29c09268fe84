import dataclasses
import gc
import math

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt.memory.ledger import (
    ITEMS,
    MemorySettings,
    ablation,
    choose_loss_chunk,
    block_saved_bytes,
    predict_memory,
    saved_activation_bytes,
)
from functional_memopt.memory.measure import TensorMemoryTracker, untied_loss_fn, untied_params
from functional_memopt import adamw
from functional_memopt.train.step import init_train_state, make_train_step

SMALL = fm.ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=32)


def _n_params(cfg):
    return sum(math.prod(s) for s in fm.param_shapes(cfg).values())


def _hooked_saved_bytes(cfg, batch_size, seq_len, dtype, remat):
    """Bytes of the distinct storages loss_fn saves for backward, params and batch excluded."""
    leaves, spec = optree.tree_flatten(fm.init_params(cfg, dtype=dtype))
    leaves = [x.detach().requires_grad_() for x in leaves]
    params = optree.tree_unflatten(spec, leaves)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len)
    skip = {x.untyped_storage().data_ptr() for x in [*leaves, tokens, targets, mask]}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fm.loss_fn(params, tokens, targets, cfg, mask=mask, remat=remat)
    return sum(saved.values())


@pytest.mark.parametrize("remat", [None, "all", 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cfg, batch_size, seq_len",
    [
        (SMALL, 3, 16),
        (fm.ModelConfig(vocab_size=64, block_size=24, n_layer=3, n_head=2, n_embd=24, bias=False), 2, 24),
        (fm.ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=8, n_embd=64, mlp_ratio=2), 5, 7),
    ],
)
@pytest.mark.parametrize("attention", ["auto", "sdpa", "math"])
def test_activation_formula_equals_the_bytes_autograd_saves(cfg, batch_size, seq_len, dtype, remat, attention):
    # Exact: every tensor loss_fn saves is in the formula and nothing else is. "auto" is "math"
    # in bfloat16 here (T <= 4 x head width on the CPU) and "sdpa" in float32.
    cfg = dataclasses.replace(cfg, attention=attention)
    counted = _hooked_saved_bytes(cfg, batch_size, seq_len, dtype, remat)
    assert counted == saved_activation_bytes(cfg, batch_size, seq_len, compute_dtype=dtype, remat=remat)


def test_remat_keeps_a_block_input_instead_of_every_activation():
    N, C = 4 * 32, SMALL.n_embd
    per_block = block_saved_bytes(SMALL, N, compute_bytes=4, stat_bytes=4)
    full = saved_activation_bytes(SMALL, 4, 32)
    assert full - saved_activation_bytes(SMALL, 4, 32, remat="all") == SMALL.n_layer * (per_block - N * C * 4)
    assert full - saved_activation_bytes(SMALL, 4, 32, remat=[1]) == per_block - N * C * 4


def test_fp32_params_take_four_bytes_per_parameter():
    for cfg in (SMALL, fm.get_config("tiny"), fm.get_config("gpt2")):
        p = predict_memory(cfg, batch_size=1, seq_len=8)
        assert p.params == 4 * _n_params(cfg)
        assert p.optimizer == 8 * _n_params(cfg)
        assert p.compute_params == 0
    n = sum(x.numel() for x in optree.tree_leaves(fm.init_params(SMALL)))
    assert predict_memory(SMALL, batch_size=1, seq_len=8).params == 4 * n


def test_a_mixed_policy_adds_a_half_precision_copy_of_the_params():
    p = predict_memory(SMALL, batch_size=2, seq_len=16, policy="mixed_bf16")
    assert p.params == 4 * _n_params(SMALL) and p.compute_params == 2 * _n_params(SMALL)
    assert p.activations < predict_memory(SMALL, batch_size=2, seq_len=16).activations


def test_tying_removes_v_times_c_from_params_gradients_and_optimizer_state():
    kw = dict(batch_size=2, seq_len=16)
    tied, untied = predict_memory(SMALL, tied=True, **kw), predict_memory(SMALL, tied=False, **kw)
    vc4 = SMALL.vocab_size * SMALL.n_embd * 4
    assert untied.params - tied.params == vc4
    assert untied.gradients - tied.gradients == vc4
    assert untied.optimizer - tied.optimizer == 2 * vc4


@given(world=st.integers(1, 9), stage=st.sampled_from([0, 1, 2]))
def test_zero_shards_optimizer_state_from_stage_1_and_gradients_at_stage_2(world, stage):
    P = _n_params(SMALL)
    p = predict_memory(SMALL, batch_size=2, seq_len=16, zero_stage=stage, world_size=world)
    shard = -(-P // world)
    assert p.optimizer == 2 * 4 * (shard if stage >= 1 else P)
    assert p.gradients == 4 * (shard if stage == 2 else P)
    assert p.params == 4 * P


def test_accumulation_runs_micro_batches_and_keeps_a_float32_accumulator():
    k4 = predict_memory(SMALL, batch_size=8, seq_len=16, accum_steps=4)
    small_batch = predict_memory(SMALL, batch_size=2, seq_len=16)
    assert k4.activations == small_batch.activations
    assert k4.logits == small_batch.logits
    assert k4.accumulator == 4 * _n_params(SMALL) and small_batch.accumulator == 0


def test_the_total_is_the_largest_moment_and_its_items_add_up():
    for settings in ({}, {"remat": "all"}, {"accum_steps": 2, "policy": "mixed_fp16"}, {"donate": True}):
        p = predict_memory(fm.get_config("tiny"), batch_size=4, seq_len=128, **settings)
        assert p.total == max(p.moments.values()) == p.moments[p.phase]
        assert sum(p.peak.values()) == p.total
        assert set(p.peak) <= set(ITEMS)


def test_ablation_starts_at_the_untied_fp32_baseline_and_ends_with_every_technique():
    rows = ablation(fm.get_config("tiny"), 8, 128, accum_steps=4, remat="all", zero_stage=2, world_size=4)
    names = [name for name, _ in rows]
    chunk = choose_loss_chunk(fm.get_config("tiny"), 8 // 4 * 128)
    assert names == ["baseline", "mixed_bf16", "accum 4", "remat all", "tied", f"chunked loss {chunk}", "donated",
                     "zero2 x4", "all"]
    assert rows[0][1].settings == MemorySettings(policy="fp32", tied=False)
    assert rows[-1][1].settings == MemorySettings("mixed_bf16", 4, "all", True, 2, 4, True, chunk)
    assert all(pred.total <= rows[0][1].total for _, pred in rows)
    assert rows[-1][1].total < min(pred.total for _, pred in rows[1:-1])
    # Every prediction knows its floor: params, moments and one float32 gradient (ZeRO shards them).
    p = rows[-1][1]
    assert p.floor == p.params + p.optimizer + -(-sum(math.prod(s) for s in fm.param_shapes(
        fm.get_config("tiny")).values()) // 4) * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=6, seq_len=16, accum_steps=4), "does not divide"),
        (dict(batch_size=2, seq_len=64), "longer than block_size"),
        (dict(batch_size=2, seq_len=16, policy="fp8"), "get_policy"),
        (dict(batch_size=2, seq_len=16, zero_stage=3), "zero_stage"),
        (dict(batch_size=0, seq_len=16), "batch_size"),
        (dict(batch_size=2, seq_len=16, device="tpu"), "device"),
    ],
)
def test_bad_settings_raise_a_value_error_that_says_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_memory(SMALL, **kwargs)


def test_an_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match="unknown settings"):
        predict_memory(SMALL, batch_size=2, seq_len=16, remat_every=2)


def _tracked_peak(cfg, batch_size, seq_len, s: MemorySettings):
    params = fm.init_params(cfg)
    if not s.tied:
        params = untied_params(params)
    opt = adamw(1e-3)
    state = init_train_state(params, opt, policy=s.policy)
    step = make_train_step(cfg, opt, policy=s.policy, accum_steps=s.accum_steps, remat=s.remat, donate=s.donate,
                           loss_fn=None if s.tied else untied_loss_fn(cfg, remat=s.remat), loss_chunk=s.loss_chunk)
    batch = fm.sample_batch(fm.load_corpus(), batch_size, seq_len, seed=0, index=0)
    state, _ = step(state, batch)  # the step measured is a second one, as in training
    gc.collect()
    tracker = TensorMemoryTracker().track((state, batch))
    with tracker:
        step(state, batch)
    return tracker.peak


MEASURED = fm.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)


@pytest.mark.parametrize(
    "settings",
    [
        MemorySettings(),
        MemorySettings(tied=False),
        MemorySettings(policy="mixed_bf16"),
        MemorySettings(accum_steps=4),
        MemorySettings(donate=True),
        MemorySettings(policy="mixed_fp16", accum_steps=2, tied=False),
        MemorySettings(remat="all"),
        MemorySettings(policy="mixed_bf16", remat="all", donate=True),
        MemorySettings(policy="bf16", remat=2, accum_steps=2),
        MemorySettings(loss_chunk=64),
        MemorySettings(policy="mixed_bf16", loss_chunk=128, accum_steps=2),
        MemorySettings(policy="mixed_bf16", remat="all", accum_steps=4, donate=True, loss_chunk=64),
        MemorySettings(policy="mixed_fp16", remat=2, loss_chunk=32),
    ],
)
def test_the_predicted_peak_matches_the_live_tensor_peak_of_a_real_step(settings):
    # Within 3%: the ledger counts every tensor of the step; what remains is rounding in the
    # per-moment model (which gradients of a block exist when its backward peaks).
    measured = _tracked_peak(MEASURED, 16, 64, settings)
    predicted = predict_memory(MEASURED, batch_size=16, seq_len=64, **settings._asdict()).total
    assert abs(measured / predicted - 1) < 0.03, (measured, predicted)


HEAD_HEAVY = fm.ModelConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize(
    "settings",
    [
        MemorySettings(policy="mixed_bf16", remat="all", accum_steps=4, donate=True, loss_chunk=64),
        MemorySettings(policy="mixed_fp16", accum_steps=1, loss_chunk=32),
        MemorySettings(policy="mixed_bf16", remat="all", accum_steps=4, donate=True),
    ],
)
def test_the_prediction_holds_where_the_tied_head_is_most_of_the_model(settings):
    # wte is 83% of these params: the head's gradient (sent into the accumulator by the chunked
    # loss, or waiting in the compute dtype until the embedding's backward) and the embeddings'
    # dense gradient tables decide the peak.
    measured = _tracked_peak(HEAD_HEAVY, 16, 64, settings)
    predicted = predict_memory(HEAD_HEAVY, batch_size=16, seq_len=64, **settings._asdict()).total
    assert abs(measured / predicted - 1) < 0.03, (measured, predicted)


# Width 256 and 16 tokens: the params are 100x the activations, so the optimizer update decides
# the peak. Out of place the fused kernel steps a copy of params, mu and nu (three new trees);
# donated it steps them in place (nothing new), and a backward moment decides the peak instead.
PARAM_HEAVY = fm.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=256)


@pytest.mark.parametrize(
    "settings",
    [
        MemorySettings(),
        MemorySettings(tied=False),
        MemorySettings(policy="mixed_bf16"),
        MemorySettings(policy="bf16"),
        MemorySettings(donate=True),
        MemorySettings(policy="bf16", donate=True),
    ],
)
def test_the_prediction_holds_where_the_optimizer_update_decides_the_peak(settings):
    measured = _tracked_peak(PARAM_HEAVY, 2, 8, settings)
    predicted = predict_memory(PARAM_HEAVY, batch_size=2, seq_len=8, **settings._asdict())
    assert settings.donate or predicted.phase == "update", predicted.phase
    assert abs(measured / predicted.total - 1) < 0.03, (measured, predicted.total)


# Sixteen heads of width 4 at T = 64: the math kernel's (B, h, T, T) probabilities are 16C per
# token, and a block's softmax backward, not the loss or its MLP, decides the peak (without that
# moment the ledger falls 20% short).
ATTENTION_HEAVY = fm.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=16, n_embd=64, attention="math")


@pytest.mark.parametrize(
    "settings",
    [
        MemorySettings(policy="mixed_bf16", loss_chunk=32),
        MemorySettings(loss_chunk=32),
        MemorySettings(policy="mixed_bf16", remat="all", loss_chunk=32),
        MemorySettings(remat=1, accum_steps=2, loss_chunk=32),
    ],
)
def test_the_prediction_holds_where_the_math_kernels_scores_decide_the_peak(settings):
    measured = _tracked_peak(ATTENTION_HEAVY, 16, 64, settings)
    predicted = predict_memory(ATTENTION_HEAVY, batch_size=16, seq_len=64, **settings._asdict())
    assert predicted.phase.startswith("block"), predicted.phase
    assert abs(measured / predicted.total - 1) < 0.03, (measured, predicted.total)


def test_block_saved_bytes_needs_t_for_the_math_kernel_and_knows_only_the_two_kernels():
    N, C, h, T = 4 * 32, SMALL.n_embd, SMALL.n_head, 32
    sdpa = block_saved_bytes(SMALL, N, compute_bytes=2, stat_bytes=2)
    assert block_saved_bytes(SMALL, N, compute_bytes=2, stat_bytes=2, seq_len=T, kernel="math") == sdpa + N * (
        h * T * 2 - 4 * h)
    with pytest.raises(ValueError, match="seq_len >= 1"):
        block_saved_bytes(SMALL, N, compute_bytes=2, stat_bytes=2, kernel="math")
    with pytest.raises(ValueError, match="kernel must be 'sdpa' or 'math'"):
        block_saved_bytes(SMALL, N, compute_bytes=2, stat_bytes=2, seq_len=T, kernel="auto")
