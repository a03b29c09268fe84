"""Text generation: a pure, seeded function of the params and the prompt.

Each new token runs the model on the last ``block_size`` tokens (no key/value cache: the model is
a pure function of its inputs, and generation is a demonstration, not a serving path). Sampling
draws from a CPU ``torch.Generator`` seeded by ``seed``, so the same call gives the same tokens
on every run and device type; ``temperature=0`` is greedy decoding.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import ModelConfig
from .gpt import apply
from .layout import check_params

__all__ = ["generate"]


def _prompt_tensor(prompt_ids, cfg: ModelConfig) -> torch.Tensor:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.is_floating_point() or prompt_ids.dtype == torch.bool:
            raise TypeError(f"generate: prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}.")
        ids = prompt_ids.detach().to("cpu", torch.long)
    else:
        try:
            ids = torch.tensor(list(prompt_ids), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"generate: prompt_ids must be a sequence of ints or a tensor ({err}).") from None
    if ids.dim() not in (1, 2) or ids.shape[-1] == 0:
        raise ValueError(
            f"generate: prompt_ids must be a non-empty (T,) or (B, T) sequence of ids, got shape {tuple(ids.shape)}; "
            "give at least one token (e.g. a newline)."
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(
            f"generate: token id {lo if lo < 0 else hi} is outside [0, vocab_size={cfg.vocab_size}); "
            "check the prompt matches the model's vocabulary."
        )
    return ids


def generate(
    params: dict,
    cfg: ModelConfig,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The prompt followed by ``max_new_tokens`` sampled tokens.

    Args:
        params: a params tree for ``cfg`` (any floating dtype; the model runs in it).
        cfg: the model config.
        prompt_ids: (T,) or (B, T) token ids, T >= 1; the context is cropped to the last
            ``block_size`` tokens at each step.
        max_new_tokens: tokens to add, >= 0.
        temperature: logits are divided by it before sampling; 0 picks the most likely token.
        top_k: sample only among the ``top_k`` most likely tokens (None: all).
        seed: the sampling seed; the same seed gives the same tokens.

    Returns:
        int64 ids on the CPU, shaped like ``prompt_ids`` with ``max_new_tokens`` more columns.

    Example:
        >>> from functional_memopt import init_params
        >>> cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
        >>> generate(init_params(cfg), cfg, [104, 105], max_new_tokens=3, seed=0).shape
        torch.Size([5])
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"generate: cfg must be a ModelConfig, got {type(cfg).__name__}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}; 0 means greedy.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}.")
    check_params(params, cfg)
    ids = _prompt_tensor(prompt_ids, cfg)
    single = ids.dim() == 1
    seq = ids[None, :] if single else ids  # (B, T)
    device = params["wte"].device
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _ in range(max_new_tokens):
            context = seq[:, -cfg.block_size:].to(device)
            logits = apply(params, context, cfg, check=False)[:, -1, :].float().cpu()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)  # (B, 1)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0] if single else seq
