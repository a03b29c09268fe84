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

__all__ = ["generate", "check_sampling", "MIN_TEMPERATURE", "MAX_TEMPERATURE"]

# Outside these, sampling degenerates: below, logits / temperature overflow float32 and sampling is
# greedy decoding up to rounding; above, it is uniform over the vocabulary whatever the model says.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3


def check_sampling(temperature, top_k, vocab_size: int | None = None, *, caller: str = "generate",
                   names: tuple[str, str] = ("temperature", "top_k")) -> None:
    """Raise ValueError for a temperature or top-k that would make sampling degenerate, naming the fix.

    Args:
        temperature: 0 (greedy) or a number in [MIN_TEMPERATURE, MAX_TEMPERATURE].
        top_k: None or an int in [1, vocab_size].
        vocab_size: the model's (None: top_k's upper bound is not checked).
        caller, names: the start of messages and what the caller calls the two values (e.g. flags).
    """
    t_name, k_name = names
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"{caller}: {t_name} must be a finite number >= 0, got {temperature!r}; 0 means greedy.")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"{caller}: {t_name} {temperature:g} is below {MIN_TEMPERATURE:g}, where logits / temperature "
                         f"overflow and sampling is greedy decoding up to rounding; pass {t_name} 0 for greedy "
                         "decoding.")
    if temperature > MAX_TEMPERATURE:
        raise ValueError(f"{caller}: {t_name} {temperature:g} is above {MAX_TEMPERATURE:g}, where sampling is uniform "
                         f"over the vocabulary whatever the model says; pass a {t_name} of at most "
                         f"{MAX_TEMPERATURE:g} (1 samples the model's own distribution).")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{caller}: {k_name} must be None or an int >= 1, got {top_k!r}.")
    if top_k is not None and vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"{caller}: {k_name} {top_k} exceeds the model's vocabulary of {vocab_size} tokens; pass at "
                         f"most {vocab_size}, or leave it out to sample among all tokens.")


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
            Otherwise in [1e-3, 1e3]: outside, sampling degenerates (see :func:`check_sampling`).
        top_k: sample only among the ``top_k`` most likely tokens (None: all), at most the vocabulary.
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
    check_sampling(temperature, top_k, cfg.vocab_size)
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
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("generate: the model's logits hold inf or nan; its params are damaged or beyond "
                                 "the precision they run in (run them in float32).")
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
