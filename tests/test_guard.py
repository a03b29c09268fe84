"""The step's two checks: its batch (once per step) and the non-finite update guard."""

import pytest
import torch

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt.testing import assert_trees_equal
from functional_memopt.train.guard import nonfinite_leaves
from functional_memopt.train.step import init_train_state, make_train_step

CFG = fm.ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(B=4, T=8, **fields):
    g = torch.Generator().manual_seed(0)
    b = fm.Batch(torch.randint(0, 32, (B, T), generator=g), torch.randint(0, 32, (B, T), generator=g),
                 torch.ones(B, T))
    return b._replace(**fields)


BAD_BATCHES = {
    "an id >= vocab": (lambda b: b._replace(tokens=b.tokens.clone().index_fill_(1, torch.tensor([3]), 32)),
                       ValueError, r"batch.tokens holds the id 32, outside \[0, vocab_size=32\)"),
    "a negative id": (lambda b: b._replace(tokens=b.tokens - 1 - b.tokens.max()), ValueError,
                      r"batch.tokens holds the id -\d+, outside"),
    "a target >= vocab": (lambda b: b._replace(targets=b.targets + 40), ValueError,
                          r"batch.targets holds the id .* or IGNORE_INDEX \(-100\)"),
    "T > block_size": (lambda b: batch(T=9), ValueError, "batch.tokens has 9 positions, more than the model's "
                                                         "block_size 8; cut the sequences"),
    "float tokens": (lambda b: b._replace(tokens=b.tokens.float()), TypeError,
                     r"batch.tokens must hold int64 token ids, got dtype torch.float32; convert with tokens.long\(\)"),
    "uint8 tokens": (lambda b: b._replace(tokens=b.tokens.to(torch.uint8)), TypeError, "got dtype torch.uint8"),
    "a 1-D row": (lambda b: b._replace(tokens=b.tokens[0], targets=b.targets[0]), ValueError,
                  r"batch.tokens must have shape \(B, T\), got \(8,\)"),
    "an attention_mask of another shape": (lambda b: b._replace(attention_mask=torch.ones(4, 7, dtype=torch.bool)),
                                           ValueError, r"batch.attention_mask has shape \(4, 7\), but batch.tokens "
                                                       r"has \(4, 8\)"),
    "segment_ids of another shape": (lambda b: b._replace(segment_ids=torch.zeros(2, 8, dtype=torch.long)),
                                     ValueError, r"batch.segment_ids has shape \(2, 8\)"),
    "float segment_ids": (lambda b: b._replace(segment_ids=torch.zeros(4, 8)), TypeError,
                          "segment_ids must hold integer document ids"),
    "a mask of another shape": (lambda b: b._replace(mask=torch.ones(4)), ValueError, r"batch.mask has shape \(4,\)"),
    "no targets": (lambda b: b._replace(targets=None), TypeError, "batch.targets must be a"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_a_bad_batch_is_refused_naming_the_field_and_the_fix_before_anything_runs(case):
    make, error, match = BAD_BATCHES[case]
    opt = fm.adamw(1e-3)
    state = init_train_state(fm.init_params(CFG), opt)
    before = fmtree.tree_map(torch.clone, state)
    step = make_train_step(CFG, opt, accum_steps=2)
    with pytest.raises(error, match=match) as e:
        step(state, make(batch()))
    assert str(e.value).startswith("train step: batch.")
    assert_trees_equal(state, before)


def test_init_params_refuses_a_dict_for_the_config():
    with pytest.raises(TypeError, match="init_params: cfg must be a ModelConfig, got dict"):
        fm.init_params(CFG.to_dict())


def test_nonfinite_leaves_names_infs_and_nans_but_not_huge_finite_values():
    params = {"a": torch.full((3,), 3e38), "b": torch.ones(2, dtype=torch.float16) * 6e4}
    assert nonfinite_leaves(params, {"m": torch.full((2,), 1e30)}) == []  # squares overflow, values do not
    params["b"][1] = float("inf")
    assert sorted(nonfinite_leaves(params, {"m": torch.tensor([float("nan"), 1.0])})) == ["opt_state.m", "params.b"]


def overflow_step(donate, loss_scale=None):
    # lr 1e39 (float32 max ~3.4e38): finite gradients, a non-finite update.
    opt = fm.adamw(1e39, weight_decay=0.0)
    state = init_train_state(fm.init_params(CFG), opt, loss_scale=loss_scale)
    return state, make_train_step(CFG, opt, donate=donate)


def test_a_non_finite_update_is_skipped_like_an_overflow_step_and_counted():
    state, step = overflow_step(False, loss_scale=fm.dynamic_loss_scale(2.0**4))
    before = fmtree.tree_map(torch.clone, state)
    new, m = step(state, batch())
    assert bool(m["skipped"]) and bool(m["nonfinite_update"]) and torch.isfinite(m["grad_norm"])
    assert_trees_equal((new.step, new.params, new.opt_state), (before.step, before.params, before.opt_state))
    assert float(new.loss_scale.loss_scale) == 8.0  # backed off, as after an overflow
    ok_state = init_train_state(fm.init_params(CFG), fm.adamw(1e-3))
    _, m = make_train_step(CFG, fm.adamw(1e-3))(ok_state, batch())
    assert not bool(m["nonfinite_update"]) and not bool(m["skipped"])


def test_a_damaged_second_moment_is_not_written_into_the_params():
    opt = fm.adamw(1e-3)
    state = init_train_state(fm.init_params(CFG), opt)
    state.opt_state.nu["wpe"][0] = -1.0  # sqrt of a negative second moment: nan
    new, m = make_train_step(CFG, opt)(state, batch())
    assert bool(m["nonfinite_update"]) and new.params is state.params and int(new.step) == 0


def test_a_donated_step_whose_update_is_not_finite_raises_naming_the_leaves_and_the_step():
    state, step = overflow_step(True)
    with pytest.raises(fm.NonFiniteUpdateError, match=r"train step: update 1 wrote inf or nan into \['params\.") as e:
        step(state, batch())
    assert e.value.step == 1 and e.value.leaves and all(k.startswith(("params.", "opt_state.")) for k in e.value.leaves)


def test_without_the_guard_the_non_finite_update_goes_through():
    state, _ = overflow_step(False)
    opt = fm.adamw(1e39, weight_decay=0.0)
    new, m = make_train_step(CFG, opt, guard_updates=False)(state, batch())
    assert not bool(m["skipped"]) and nonfinite_leaves(new.params, new.opt_state)
