import dataclasses

import pytest

import functional_memopt as fm


def test_presets_have_the_gpt2_family_shapes():
    assert fm.get_config("gpt2").n_embd == 768 and fm.get_config("gpt2").n_layer == 12
    assert fm.get_config("gpt2-medium").n_layer == 24
    assert fm.get_config("gpt2-large").n_embd == 1280
    assert fm.get_config("gpt2-xl").n_head == 25
    assert fm.get_config("tiny").vocab_size == 256


def test_config_is_frozen_and_replace_revalidates():
    cfg = fm.get_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 2
    with pytest.raises(ValueError, match="divisible by n_head"):
        dataclasses.replace(cfg, n_embd=130)


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
def test_non_positive_sizes_are_rejected_with_the_field_name(field):
    with pytest.raises(ValueError, match=field):
        fm.ModelConfig(**{field: 0})


def test_dict_round_trip_and_unknown_keys():
    cfg = fm.ModelConfig(n_layer=3, bias=False, layer_norm_eps=1e-6)
    assert fm.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        fm.ModelConfig.from_dict({"n_layers": 3})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="gpt2-medium"):
        fm.get_config("gpt3")
