"""A local, random Hugging Face GPT-2 to compare against, built from a ModelConfig (no download).

    model = make_hf_gpt2(cfg, seed=0)          # eval mode, no dropout, random biases and norms
    params = params_from_hf(model)             # this library's params tree, same weights
    model = hf_from_params(params, cfg)        # and back
    logits = hf_logits(model, tokens, attention_mask)
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from functional_memopt import ModelConfig
from functional_memopt.io.gpt2 import (
    config_from_gpt2_config,
    gpt2_config_from_config,
    gpt2_state_dict_from_params,
    params_from_gpt2_state_dict,
)


def hf_config(cfg: ModelConfig, *, attn_implementation: str = "eager") -> GPT2Config:
    """The GPT2Config of ``cfg``, dropout off, with an explicit attention implementation."""
    fields = {k: v for k, v in gpt2_config_from_config(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    config = GPT2Config(**fields)
    config._attn_implementation = attn_implementation
    return config


def make_hf_gpt2(cfg: ModelConfig, seed: int = 0, *, attn_implementation: str = "eager", scale: float = 0.1):
    """A ``GPT2LMHeadModel`` of shape ``cfg`` in eval mode, every parameter ~ N(0, scale) from ``seed``.

    Biases and layer-norm parameters are random too (not transformers' zeros and ones), so a
    mapping that drops or transposes one of them shows up in the logits.
    """
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config(cfg, attn_implementation=attn_implementation)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the tied head appears once and stays tied
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def params_from_hf(model: GPT2LMHeadModel) -> dict:
    """This library's params tree holding copies of ``model``'s weights."""
    cfg = config_from_gpt2_config(model.config.to_dict())
    return params_from_gpt2_state_dict(model.state_dict(), cfg)


def hf_from_params(params: dict, cfg: ModelConfig, *, attn_implementation: str = "eager") -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` in eval mode holding ``params`` (float32)."""
    model = GPT2LMHeadModel(hf_config(cfg, attn_implementation=attn_implementation)).eval()
    missing, unexpected = model.load_state_dict(gpt2_state_dict_from_params(params, cfg), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"hf_from_params: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


@torch.no_grad()
def hf_logits(model: GPT2LMHeadModel, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """``model``'s logits (B, T, V) for ``tokens``, with an optional (B, T) padding mask."""
    return model(input_ids=tokens, attention_mask=attention_mask).logits
