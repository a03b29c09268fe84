"""Casting each block's params just in time changes memory, not gradients.

The step casts the model's params to the compute dtype inside each block (and, under remat,
inside the recomputed region) instead of casting the whole tree first. The gradients must be
bit-identical to the cast-everything-first route, and the peak of live compute copies must fall.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import testing
from functional_memopt.memory.measure import TensorMemoryTracker


def _grads(cfg, params, batch, policy, remat, *, jit: bool):
    pol = fm.get_policy(policy)
    if jit:
        loss = fm.with_policy(fm.make_loss_fn(cfg, remat=remat, compute_dtype=pol.compute_dtype), pol,
                              cast_params=False)
    else:
        loss = fm.with_policy(fm.make_loss_fn(cfg, remat=remat), pol)

    def mean(p):
        s, c = loss(p, batch)
        return s / c.clamp(min=1)

    return fm.value_and_grad(mean)(params)


@given(testing.configs(max_layer=3, min_head_dim=2), st.data(), st.sampled_from(["mixed_bf16", "mixed_fp16"]),
       st.sampled_from([None, "all", 2]))
def test_just_in_time_casts_give_bit_identical_loss_and_gradients(cfg, data, policy, remat):
    params = fm.init_params(cfg, seed=data.draw(st.integers(0, 99)))
    batch = data.draw(testing.ragged_batches(cfg))
    loss_a, grads_a = _grads(cfg, params, batch, policy, remat, jit=False)
    loss_b, grads_b = _grads(cfg, params, batch, policy, remat, jit=True)
    testing.assert_trees_equal(loss_b, loss_a)
    testing.assert_trees_equal(grads_b, grads_a)


def test_the_step_casts_just_in_time_and_matches_a_custom_loss_that_casts_everything():
    cfg = fm.ModelConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=16)
    batch = fm.sample_batch(fm.load_corpus(), 4, 16, seed=0, index=0)
    batch = batch._replace(targets=batch.targets % 64, tokens=batch.tokens % 64)
    opt = fm.adamw(1e-2)
    state = fm.init_train_state(fm.init_params(cfg), opt, policy="mixed_bf16")
    jit = fm.make_train_step(cfg, opt, policy="mixed_bf16", accum_steps=2, remat="all")
    whole = fm.make_train_step(cfg, opt, policy="mixed_bf16", accum_steps=2, remat="all",
                               loss_fn=fm.make_loss_fn(cfg, remat="all"))  # with_policy casts the tree
    testing.assert_trees_equal(jit(state, batch)[0], whole(state, batch)[0])


def _compute_copy_peak(cfg, params, batch, *, jit: bool, remat) -> int:
    """Peak bytes of live bfloat16 storages over one forward and backward."""

    class Bf16Tracker(TensorMemoryTracker):
        def track(self, tree):
            leaves = [t for t in torch.utils._pytree.tree_leaves(tree)
                      if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16]
            return super().track(leaves)

    tracker = Bf16Tracker()
    with tracker:
        _grads(cfg, params, batch, "mixed_bf16", remat, jit=jit)
    return tracker.peak


def test_under_remat_only_one_blocks_compute_copy_is_alive_beside_the_embeddings():
    # A deep, narrow model with a tiny batch: the compute copies dominate the bfloat16 bytes.
    cfg = fm.ModelConfig(vocab_size=32, block_size=4, n_layer=6, n_head=2, n_embd=64)
    params = fm.init_params(cfg)
    batch = fm.Batch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4))
    n_block = sum(v.numel() for v in torch.utils._pytree.tree_leaves(params["h"][0]))
    n_all = sum(v.numel() for v in torch.utils._pytree.tree_leaves(params))
    whole = _compute_copy_peak(cfg, params, batch, jit=False, remat="all")
    jit = _compute_copy_peak(cfg, params, batch, jit=True, remat="all")
    assert whole >= 2 * n_all  # every block's bfloat16 copy at once
    # Just in time: the embedding tables' copies (wte serves embedding and head), one block's
    # copy, and that block's bfloat16 gradients while its backward runs, plus the tiny batch's
    # bfloat16 activations (10% and 8 KiB of slack for them), instead of all six blocks.
    assert jit <= 2 * (n_all - 6 * n_block) + 1.1 * 2 * (2 * n_block) + 8192, (jit, whole)
    assert jit < whole / 3
    # Without remat the linears save their (compute-dtype) weights for the backward anyway, so
    # casting just in time keeps every copy alive until then: the same peak, as the ledger says.
    assert _compute_copy_peak(cfg, params, batch, jit=True, remat=None) >= 2 * n_all
