import json
import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.io.gpt2 import (
    config_from_gpt2_config,
    gpt2_config_from_config,
    gpt2_state_dict_from_params,
    load_gpt2,
    params_from_gpt2_state_dict,
    save_gpt2,
)

from _hf_reference import hf_from_params, hf_logits, make_hf_gpt2, params_from_hf

TOL = dict(rtol=1e-5, atol=1e-5)
CFG = fm.ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=8)


def tokens_and_mask(cfg, seed, *, rows=3):
    g = torch.Generator().manual_seed(seed)
    T = cfg.block_size
    tokens = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    lengths[0] = T  # one full row, so the padded and unpadded paths meet
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # right padding
    return tokens, mask


def from_pretrained(path, **kw):
    model, info = GPT2LMHeadModel.from_pretrained(path, output_loading_info=True, attn_implementation="eager", **kw)
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    assert set(info["missing_keys"]) <= {"lm_head.weight"}, info
    assert model.lm_head.weight is model.transformer.wte.weight
    return model.eval()


# Widths of 4 and more: layer norm over 2 features that nearly agree divides their rounding by a
# tiny spread (seen under the thorough profile: 1.2e-5 at n_embd 2, past the 1e-5 tolerance).
@given(testing.configs(bias=True, max_layer=2, max_block=10, min_head_dim=4), st.integers(0, 2**31 - 1),
       st.sampled_from(["eager", "sdpa"]))
def test_apply_gives_the_logits_of_the_hugging_face_model_with_the_same_weights(cfg, seed, attn_implementation):
    model = make_hf_gpt2(cfg, seed, scale=0.5, attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    params = params_from_hf(model)
    tokens, mask = tokens_and_mask(cfg, seed)
    torch.testing.assert_close(fm.apply(params, tokens, cfg), hf_logits(model, tokens), **TOL)
    real = mask.bool()
    ours = fm.apply(params, tokens, cfg, attention_mask=mask)
    torch.testing.assert_close(ours[real], hf_logits(model, tokens, mask)[real], **TOL)


def test_the_state_dict_mapping_round_trips_and_transposes_conv1d_weights():
    model = make_hf_gpt2(CFG, 1)
    params = params_from_hf(model)
    w = model.transformer.h[1].mlp.c_fc.weight  # Conv1D: (in, out)
    assert tuple(w.shape) == (8, 32)
    testing.assert_trees_equal(params["h"][1]["mlp"]["c_fc"]["weight"], w.detach().t().contiguous())
    sd = gpt2_state_dict_from_params(params, CFG)
    assert "lm_head.weight" not in sd and all(k.startswith("transformer.") for k in sd)
    hf_sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    testing.assert_trees_equal({k: v.contiguous() for k, v in sd.items()}, hf_sd)
    testing.assert_trees_equal(params_from_gpt2_state_dict(sd, CFG), params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_gpt2_writes_a_directory_from_pretrained_loads_with_no_missing_or_unexpected_keys(tmp_path, dtype):
    cfg = fm.ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=8, mlp_ratio=3)
    params = fmtree.tree_map(lambda x: x + 0.1 * torch.randn_like(x), fm.init_params(cfg, seed=2))
    save_gpt2(tmp_path / "gpt2", params, cfg, dtype=dtype)
    assert sorted(os.listdir(tmp_path / "gpt2")) == ["config.json", "model.safetensors"]
    model = from_pretrained(tmp_path / "gpt2", dtype=dtype)
    assert model.dtype == dtype and model.config.n_inner == 24
    testing.assert_trees_equal(params_from_hf(model), fmtree.tree_cast(params, dtype))
    tokens, mask = tokens_and_mask(cfg, 0)
    want = fm.apply(fmtree.tree_cast(fmtree.tree_cast(params, dtype), torch.float32), tokens, cfg)
    torch.testing.assert_close(hf_logits(model.float(), tokens), want, **TOL)


def test_save_gpt2_mirrors_the_layout_that_save_pretrained_writes(tmp_path):
    model = make_hf_gpt2(CFG, 3)
    model.save_pretrained(tmp_path / "hf")
    save_gpt2(tmp_path / "ours", params_from_hf(model), CFG)
    keys = {}
    for name in ("hf", "ours"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            keys[name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            assert f.metadata()["format"] == "pt"
    assert keys["ours"] == keys["hf"]
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert ours["model_type"] == "gpt2" and ours["architectures"] == ["GPT2LMHeadModel"]
    assert ours["activation_function"] == "gelu_new" and ours["n_inner"] is None and ours["tie_word_embeddings"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_load_gpt2_reads_what_save_pretrained_writes(tmp_path, dtype):
    model = make_hf_gpt2(CFG, 4, scale=0.5)
    model.to(dtype).save_pretrained(tmp_path / "hf")
    params, cfg = load_gpt2(tmp_path / "hf")
    assert cfg == CFG
    testing.assert_trees_equal(params, fmtree.tree_cast(params_from_hf(model), torch.float32))
    tokens, mask = tokens_and_mask(cfg, 4)
    torch.testing.assert_close(fm.apply(params, tokens, cfg), hf_logits(model.float(), tokens), **TOL)
    half, _ = load_gpt2(tmp_path / "hf", dtype="fp16")
    testing.assert_trees_equal(half, fmtree.tree_cast(params, torch.float16))


def test_save_then_load_gpt2_round_trips_params_and_config_bitwise(tmp_path):
    cfg = fm.ModelConfig(vocab_size=33, block_size=9, n_layer=3, n_head=3, n_embd=9, layer_norm_eps=1e-6,
                         init_std=0.03, mlp_ratio=2)
    params = fm.init_params(cfg, seed=5)
    save_gpt2(tmp_path / "m", params, cfg)
    loaded, loaded_cfg = load_gpt2(tmp_path / "m")
    assert loaded_cfg == cfg
    testing.assert_trees_equal(loaded, params)


def test_sharded_checkpoints_are_read_through_their_index(tmp_path):
    model = make_hf_gpt2(CFG, 6)
    model.save_pretrained(tmp_path / "hf", max_shard_size="2KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "hf")
    params, _ = load_gpt2(tmp_path / "hf")
    testing.assert_trees_equal(params, params_from_hf(model))


def write_checkpoint(folder, tensors, config):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_keys_with_or_without_the_prefix_and_old_mask_buffers_load_alike(tmp_path, prefix):
    model = make_hf_gpt2(CFG, 7)
    sd = {prefix + k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    for i in range(CFG.n_layer):  # what older transformers versions stored
        sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 12, 12))
        sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = model.lm_head.weight.detach().clone()
    write_checkpoint(tmp_path / "m", sd, model.config.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an lm_head equal to wte is silent
        params, cfg = load_gpt2(tmp_path / "m")
    testing.assert_trees_equal(params, params_from_hf(model))


def test_an_lm_head_that_differs_from_wte_warns_and_is_ignored(tmp_path):
    model = make_hf_gpt2(CFG, 8)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    write_checkpoint(tmp_path / "m", sd, model.config.to_dict())
    with pytest.warns(UserWarning, match="lm_head.weight differs from the token embedding wte"):
        params, _ = load_gpt2(tmp_path / "m")
    testing.assert_trees_equal(params["wte"], model.transformer.wte.weight.detach())


BAD_FIELDS = [
    ("activation_function", "relu"),
    ("activation_function", "relu"),
    ("n_inner", 20),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("tie_word_embeddings", False),
    ("scale_attn_weights", False),
    ("add_cross_attention", True),
    ("model_type", "gpt_neox"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_config_fields_this_model_cannot_represent_are_refused_by_name(field, value):
    good = gpt2_config_from_config(CFG)
    assert config_from_gpt2_config(good) == CFG
    with pytest.raises(ValueError, match=f"config field {field}="):
        config_from_gpt2_config({**good, field: value})


def test_load_gpt2_refuses_a_bad_config_and_names_the_field(tmp_path):
    model = make_hf_gpt2(CFG, 9)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_fast_x"}))
    with pytest.raises(ValueError, match="load_gpt2: config field activation_function='gelu_fast_x'"):
        load_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_head"}))
    with pytest.raises(ValueError, match="'n_head' is missing"):
        load_gpt2(tmp_path / "hf")


def test_weights_that_do_not_match_config_json_are_listed(tmp_path):
    model = make_hf_gpt2(CFG, 10)
    sd = {k: v.clone() for k, v in model.state_dict().items() if ".h.1." not in k and k != "lm_head.weight"}
    write_checkpoint(tmp_path / "m", sd, model.config.to_dict())
    with pytest.raises(ValueError, match=r"load_gpt2: .*missing keys \['h\.1\.ln_1\.weight'"):
        load_gpt2(tmp_path / "m")


def test_a_directory_with_only_pytorch_bin_weights_asks_for_conversion(tmp_path):
    model = make_hf_gpt2(CFG, 11)
    (tmp_path / "m").mkdir()
    model.config.to_json_file(tmp_path / "m" / "config.json")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="convert them to safetensors"):
        load_gpt2(tmp_path / "m")


def test_a_truncated_weights_file_is_reported(tmp_path):
    model = make_hf_gpt2(CFG, 12)
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors.*not a valid safetensors file"):
        load_gpt2(tmp_path / "hf")


def test_save_gpt2_refuses_a_non_empty_directory_unless_told_to_overwrite(tmp_path):
    params = fm.init_params(CFG, seed=0)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        save_gpt2(tmp_path / "m", params, CFG)
    assert os.listdir(tmp_path / "m") == ["notes.txt"]
    save_gpt2(tmp_path / "m", params, CFG, overwrite=True)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "notes.txt"]
    testing.assert_trees_equal(load_gpt2(tmp_path / "m")[0], params)


def test_save_gpt2_refuses_models_gpt2_cannot_hold_and_creates_nothing(tmp_path):
    no_bias = fm.ModelConfig(**{**CFG.to_dict(), "bias": False})
    with pytest.raises(ValueError, match="save_gpt2: GPT-2 has biases.*cfg.bias is False"):
        save_gpt2(tmp_path / "a", fm.init_params(no_bias), no_bias)
    params = fm.init_params(CFG, seed=0)
    params["wpe"] = params["wpe"] * 1e6
    with pytest.raises(ValueError, match="'transformer.wpe.weight'.*bfloat16"):
        save_gpt2(tmp_path / "b", params, CFG, dtype=torch.float16)
    assert os.listdir(tmp_path) == []


def test_hf_from_params_builds_the_same_model_back():
    model = make_hf_gpt2(CFG, 13, scale=0.5)
    again = hf_from_params(params_from_hf(model), CFG)
    tokens, _ = tokens_and_mask(CFG, 13)
    torch.testing.assert_close(hf_logits(again, tokens), hf_logits(model, tokens), rtol=0, atol=0)


@given(testing.configs(bias=True, max_layer=2, max_block=10, min_head_dim=2), st.integers(0, 2**31 - 1))
def test_every_gradient_and_the_tied_one_equal_the_hugging_face_models_in_float64(cfg, seed):
    # Hugging Face ties lm_head to wte, so autograd sums the embedding and head paths into one
    # gradient there; the library's tied leaf must get exactly that sum, and every other leaf its
    # HF gradient (mapped through the same state-dict layout, Conv1D transposes included).
    model = make_hf_gpt2(cfg, seed, scale=0.5).double()
    params = params_from_hf(model)
    assert params["wte"].dtype == torch.float64
    tokens, _ = tokens_and_mask(cfg, seed)
    targets = tokens.roll(-1, dims=1)
    logits = model(input_ids=tokens).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    ours = torch.func.grad(lambda p: fm.loss_fn(p, tokens, targets, cfg)[0])(params)
    mapped = gpt2_state_dict_from_params(ours, cfg)
    hf = dict(model.named_parameters())
    assert set(mapped) - {"lm_head.weight"} <= set(hf)
    for name, grad in mapped.items():
        if name in hf:
            torch.testing.assert_close(grad, hf[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    assert model.transformer.wte.weight.grad.abs().sum() > 0
