import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.model.gpt import block_apply, final_features


def _params64(cfg, seed=0):
    return fmtree.tree_cast(fm.init_params(cfg, seed=seed), torch.float64)


def test_init_params_has_exactly_the_config_shapes_and_one_embedding_leaf():
    cfg = fm.ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    params = fm.init_params(cfg, seed=1)
    flat = fmtree.tree_flatten_with_paths(params)
    assert {k: tuple(v.shape) for k, v in flat.items()} == fm.param_shapes(cfg)
    assert "lm_head.weight" not in flat and sum(v.shape == (50, 16) for v in flat.values()) == 1


def test_init_params_follows_gpt2_initialisation_statistics():
    cfg = fm.ModelConfig(n_layer=6, n_head=4, n_embd=256, block_size=64, vocab_size=512)
    p = fm.init_params(cfg, seed=0)
    assert abs(p["wte"].std().item() - 0.02) < 1e-3
    proj = torch.cat([b["mlp"]["c_proj"]["weight"].flatten() for b in p["h"]])
    assert abs(proj.std().item() - 0.02 / (2 * 6) ** 0.5) < 3e-4
    assert torch.equal(p["h"][0]["ln_1"]["weight"], torch.ones(256))
    assert torch.equal(p["h"][0]["attn"]["c_attn"]["bias"], torch.zeros(768))


def test_init_params_is_deterministic_in_the_seed_and_respects_dtype():
    cfg = fm.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11)
    testing.assert_trees_equal(fm.init_params(cfg, seed=3), fm.init_params(cfg, seed=3))
    assert not torch.equal(fm.init_params(cfg, seed=3)["wte"], fm.init_params(cfg, seed=4)["wte"])
    half = fm.init_params(cfg, seed=3, dtype=torch.bfloat16)
    assert all(x.dtype == torch.bfloat16 for x in fmtree.tree_map(lambda x: x, half).values() if isinstance(x, torch.Tensor))
    testing.assert_trees_equal(half, fmtree.tree_cast(fm.init_params(cfg, seed=3), torch.bfloat16))


@given(testing.configs(), st.data())
def test_apply_leaves_every_param_leaf_bit_identical(cfg, data):
    params = fm.init_params(cfg, seed=0)
    before = fmtree.tree_map(torch.clone, params)
    batch = data.draw(testing.token_batches(cfg))
    logits = fm.apply(params, batch.tokens, cfg)
    torch.func.grad(lambda p: fm.loss_fn(p, batch.tokens, batch.targets, cfg)[0])(params)
    assert logits.shape == (*batch.tokens.shape, cfg.vocab_size)
    testing.assert_trees_equal(params, before)


@given(testing.configs(max_block=12), st.data())
def test_causal_prefix_logits_do_not_depend_on_later_tokens(cfg, data):
    params = _params64(cfg)
    batch = data.draw(testing.token_batches(cfg, min_len=2))
    T = batch.tokens.shape[1]
    cut = data.draw(st.integers(1, T - 1))
    changed = batch.tokens.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % cfg.vocab_size
    a = fm.apply(params, batch.tokens, cfg)[:, :cut]
    b = fm.apply(params, changed, cfg)[:, :cut]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@given(testing.configs(max_block=12), st.data())
def test_appending_padding_never_changes_real_token_logits(cfg, data):
    params = _params64(cfg)
    batch = data.draw(testing.ragged_batches(cfg))
    mask = batch.attention_mask
    T = batch.tokens.shape[1]
    garbage = torch.randint(0, cfg.vocab_size, batch.tokens.shape, generator=torch.Generator().manual_seed(1))
    noisy = torch.where(mask, batch.tokens, garbage)  # padding holds arbitrary ids
    padded = fm.apply(params, noisy, cfg, attention_mask=mask)
    for i in range(batch.size):
        n = int(mask[i].sum())
        alone = fm.apply(params, batch.tokens[i : i + 1, :n], cfg)[0]
        torch.testing.assert_close(padded[i, :n], alone, rtol=1e-10, atol=1e-10)
    assert padded.shape[1] == T


@given(testing.configs(max_block=16), st.data())
def test_packed_documents_get_the_logits_they_get_when_run_alone(cfg, data):
    params = _params64(cfg)
    n_docs = data.draw(st.integers(1, 4))
    docs = [
        data.draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=2, max_size=min(cfg.block_size, 6) + 1))
        for _ in range(n_docs)
    ]
    docs = [d[: cfg.block_size + 1] for d in docs]
    batch = fm.pack_documents(docs, cfg.block_size)
    logits = fm.apply(params, batch.tokens, cfg, segment_ids=batch.segment_ids)
    for doc_id, doc in enumerate(docs):
        row, cols = (batch.segment_ids == doc_id).nonzero(as_tuple=True)
        alone = fm.apply(params, torch.tensor([doc[:-1]]), cfg)[0]
        torch.testing.assert_close(logits[row, cols], alone, rtol=1e-10, atol=1e-10)


@given(testing.configs(), st.data())
def test_tied_leaf_gradient_is_the_sum_of_embedding_and_head_path_gradients(cfg, data):
    params = _params64(cfg)
    batch = data.draw(testing.token_batches(cfg))

    def untied_loss(emb, head, rest):
        # The same network with the embedding and the head as two separate leaves.
        p = dict(rest, wte=emb)
        x = torch.nn.functional.embedding(batch.tokens, emb) + rest["wpe"][: batch.tokens.shape[1]]
        for block in p["h"]:
            x = block_apply(block, x, cfg=cfg, mask=None)
        ln = p["ln_f"]
        x = torch.nn.functional.layer_norm(x, (cfg.n_embd,), ln["weight"], ln.get("bias"), cfg.layer_norm_eps)
        logits = x @ head.T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum")

    tied = torch.func.grad(lambda p: fm.loss_fn(p, batch.tokens, batch.targets, cfg)[0])(params)["wte"]
    rest = {k: v for k, v in params.items() if k != "wte"}
    g_emb, g_head = torch.func.grad(untied_loss, argnums=(0, 1))(params["wte"], params["wte"].clone(), rest)
    torch.testing.assert_close(tied, g_emb + g_head, rtol=1e-10, atol=1e-12)
    if cfg.n_embd > 1:  # a width-1 layer norm outputs its bias alone, so the head path can vanish
        assert g_head.abs().sum() > 0


def test_final_features_are_the_features_the_head_of_apply_reads():
    # Documents, a key mask and a compute dtype all reach the features; the head is wte itself.
    cfg = fm.ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=13)
    params = fm.init_params(cfg, seed=0)
    tokens = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]]),
                  segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]]), compute_dtype=torch.bfloat16)
    x = final_features(params, tokens, cfg, remat="all", **kwargs)
    assert x.shape == (2, 6, 8) and x.dtype == torch.bfloat16
    logits = torch.nn.functional.linear(x, params["wte"].to(torch.bfloat16))
    assert torch.equal(logits, fm.apply(params, tokens, cfg, **kwargs))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_either_activation_gives_the_reference_module_logits(activation):
    # In float64 the tolerance is rounding alone: the other GELU misses it at every logit.
    from functional_memopt.testing.reference import ReferenceGPT

    cfg = fm.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=13, activation=activation)
    params = _params64(cfg)
    tokens = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
    want = ReferenceGPT.from_params(params, cfg)(tokens).detach()
    assert want.dtype == torch.float64
    torch.testing.assert_close(fm.apply(params, tokens, cfg), want, rtol=1e-10, atol=1e-12)


def test_loss_fn_returns_fp32_sum_and_count_with_ignore_index_and_mask():
    cfg = fm.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=13)
    params = fm.init_params(cfg, seed=0)
    tokens = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
    targets = tokens.roll(-1, 1)
    targets[0, 5] = fm.IGNORE_INDEX
    mask = torch.ones(2, 6)
    mask[1, :2] = 0
    total, count = fm.loss_fn(fmtree.tree_cast(params, torch.bfloat16), tokens, targets, cfg, mask=mask)
    assert total.dtype == torch.float32 and count.item() == 12 - 1 - 2
    logits = fm.apply(params, tokens, cfg)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    want = (nll * mask.flatten()).sum()
    full, _ = fm.loss_fn(params, tokens, targets, cfg, mask=mask)
    torch.testing.assert_close(full, want)
    torch.testing.assert_close(total, want, rtol=0.05, atol=0)


def test_untrained_loss_is_near_log_vocab():
    cfg = fm.get_config("tiny")
    params = fm.init_params(cfg, seed=0)
    batch = fm.sample_batch(fm.load_corpus(), 4, 64, seed=0, index=0)
    s, c = fm.loss_fn(params, batch.tokens, batch.targets, cfg)
    assert abs((s / c).item() - torch.log(torch.tensor(256.0)).item()) < 0.1


# ------------------------------------------------------------------------------ bad input

CFG = fm.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=13)


def test_token_id_outside_vocab_names_the_id_and_vocab_size():
    params = fm.init_params(CFG)
    with pytest.raises(ValueError, match=r"token id 13 .*vocab_size=13"):
        fm.apply(params, torch.tensor([[1, 13]]), CFG)
    with pytest.raises(ValueError, match=r"token id -1"):
        fm.apply(params, torch.tensor([[-1, 2]]), CFG)
    with pytest.raises(ValueError, match=r"token id 13 "):  # the bad id, not the smallest (0)
        fm.apply(params, torch.tensor([[0, 13]]), CFG)


def test_sequence_longer_than_block_size_gives_both_numbers():
    with pytest.raises(ValueError, match=r"length 7 .*block_size 6"):
        fm.apply(fm.init_params(CFG), torch.zeros(1, 7, dtype=torch.long), CFG)


def test_float_tokens_are_a_type_error():
    with pytest.raises(TypeError, match="integer ids"):
        fm.apply(fm.init_params(CFG), torch.zeros(1, 3), CFG)


def test_params_that_do_not_match_the_config_list_every_mismatch():
    params = fm.init_params(CFG)
    del params["ln_f"]["bias"]
    params["wpe"] = torch.zeros(5, 8)
    params["extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        fm.apply(params, torch.zeros(1, 3, dtype=torch.long), CFG)
    text = str(err.value)
    assert "ln_f.bias" in text and "wpe: expected (6, 8), got (5, 8)" in text and "extra" in text
    bigger = dataclasses.replace(CFG, n_layer=2)
    with pytest.raises(ValueError, match=r"missing keys \['h\.1\."):
        fm.apply(fm.init_params(CFG), torch.zeros(1, 3, dtype=torch.long), bigger)
