import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt.model.generate import generate
from functional_memopt.testing import assert_trees_equal

CFG = fm.ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
PARAMS = fm.init_params(CFG, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@given(st.integers(0, 2**31 - 1), st.floats(0.3, 2.0), st.one_of(st.none(), st.integers(1, CFG.vocab_size)))
def test_the_same_seed_gives_the_same_tokens(seed, temperature, top_k):
    a = generate(PARAMS, CFG, [1, 2, 3], max_new_tokens=12, temperature=temperature, top_k=top_k, seed=seed)
    b = generate(PARAMS, CFG, [1, 2, 3], max_new_tokens=12, temperature=temperature, top_k=top_k, seed=seed)
    assert torch.equal(a, b)
    assert a.shape == (15,) and a.dtype == torch.int64 and a[:3].tolist() == [1, 2, 3]
    assert int(a.min()) >= 0 and int(a.max()) < CFG.vocab_size


def test_different_seeds_give_different_samples():
    runs = {tuple(generate(PARAMS, CFG, [5], max_new_tokens=20, seed=s).tolist()) for s in range(4)}
    assert len(runs) > 1


@given(st.lists(st.integers(0, 31), min_size=1, max_size=12), st.integers(0, 14))
def test_greedy_equals_the_argmax_of_apply_step_by_step_with_the_context_cropped(prompt, n_new):
    got = generate(PARAMS, CFG, prompt, max_new_tokens=n_new, temperature=0)
    seq = list(prompt)
    for _ in range(n_new):
        context = torch.tensor([seq[-CFG.block_size:]])
        seq.append(int(fm.apply(PARAMS, context, CFG)[0, -1].argmax()))
    assert got.tolist() == seq


def test_top_k_of_one_is_greedy_at_any_temperature():
    greedy = generate(PARAMS, CFG, [3, 4], max_new_tokens=10, temperature=0)
    assert torch.equal(generate(PARAMS, CFG, [3, 4], max_new_tokens=10, temperature=1.7, top_k=1, seed=9), greedy)


def test_sampling_follows_the_softmax_of_the_last_logits():
    # Frequencies of the first sampled token over many seeds match softmax(logits / T).
    prompt = torch.tensor([7, 8, 9])
    probs = torch.softmax(fm.apply(PARAMS, prompt[None], CFG)[0, -1] / 0.5, -1)
    counts = torch.zeros(CFG.vocab_size)
    for s in range(400):
        counts[generate(PARAMS, CFG, prompt, max_new_tokens=1, temperature=0.5, seed=s)[-1]] += 1
    assert (counts / 400 - probs).abs().max() < 0.1


def test_a_batch_of_prompts_is_generated_row_by_row():
    prompts = torch.tensor([[1, 2], [3, 4]])
    both = generate(PARAMS, CFG, prompts, max_new_tokens=5, temperature=0)
    assert both.shape == (2, 7)
    for row in range(2):
        assert torch.equal(both[row], generate(PARAMS, CFG, prompts[row], max_new_tokens=5, temperature=0))


def test_generate_leaves_params_and_prompt_untouched_and_runs_in_half_precision():
    params = fmtree.tree_cast(PARAMS, torch.bfloat16)
    before = fmtree.tree_map(torch.clone, params)
    prompt = torch.tensor([1, 2, 3])
    out = generate(params, CFG, prompt, max_new_tokens=4, seed=1)
    assert out.shape == (7,) and prompt.tolist() == [1, 2, 3]
    assert_trees_equal(params, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_ids": []}, "non-empty"),
        ({"prompt_ids": [40]}, "outside"),
        ({"prompt_ids": torch.tensor([1.0])}, "integer token ids"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 33}, "top_k 33 exceeds the model's vocabulary of 32 tokens"),
        ({"temperature": 1e-40}, "temperature 1e-40 is below 0.001.*pass temperature 0 for greedy"),
        ({"temperature": 1e5}, "temperature 100000 is above 1000"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named(kwargs, match):
    args = {"prompt_ids": [1], "max_new_tokens": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        generate(PARAMS, CFG, args.pop("prompt_ids"), **args)
