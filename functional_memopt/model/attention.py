"""Causal self-attention with one fused QKV projection, and the masks it understands.

The only mask built by default is none at all: with a purely causal pattern the SDPA kernel is
called with ``is_causal=True`` so no (T, T) tensor exists and the flash / memory-efficient kernels
can serve. Padding (key) masks and document (segment) masks add a boolean (B, 1, T, T) mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["causal_attention", "build_attention_mask", "positions_from_segments"]


def build_attention_mask(
    seq_len: int,
    *,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The boolean mask (True = may attend) for SDPA, or None when causal alone suffices.

    Args:
        seq_len: T.
        attention_mask: (B, T), nonzero for real tokens, zero for padding keys.
        segment_ids: (B, T) integer document ids; a token attends only within its document.
        device: where to build the mask.

    Returns:
        None (use ``is_causal=True``) or a bool tensor (B, 1, T, T).

    A query whose every key is masked would make softmax return nan; the diagonal is always
    allowed, which changes nothing for real tokens (they may already attend to themselves).
    """
    if attention_mask is None and segment_ids is None:
        return None
    idx = torch.arange(seq_len, device=device)
    mask = (idx[:, None] >= idx[None, :])[None, None]  # (1, 1, T, T) causal
    if segment_ids is not None:
        same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        mask = mask & same_doc[:, None]
    if attention_mask is not None:
        keys = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
        mask = mask & keys
    eye = (idx[:, None] == idx[None, :])[None, None]
    return mask | eye


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at the start of each contiguous document.

    Args:
        segment_ids: (B, T) integer document ids, each document contiguous in its row.

    Returns:
        (B, T) int64 positions.

    Example:
        >>> positions_from_segments(torch.tensor([[0, 0, 1, 1, 1]])).tolist()
        [[0, 1, 0, 1, 2]]
    """
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.zeros_like(idx)
    boundary = torch.ones_like(segment_ids, dtype=torch.bool)
    boundary[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(boundary, idx, starts)
    starts = torch.cummax(starts, dim=1).values
    return idx - starts


def causal_attention(
    x: torch.Tensor,
    c_attn: dict,
    c_proj: dict,
    n_head: int,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head causal self-attention with one fused QKV matmul.

    Args:
        x: (B, T, C) input.
        c_attn: {"weight": (3C, C), "bias": (3C,) optional}, the fused Q, K, V projection.
        c_proj: {"weight": (C, C), "bias": (C,) optional}, the output projection.
        n_head: heads; C must be divisible by it.
        mask: None for plain causal attention, else a bool (B, 1, T, T) from build_attention_mask.

    Returns:
        (B, T, C) output.
    """
    qkv = F.linear(x, c_attn["weight"], c_attn.get("bias"))  # (B, T, 3C)
    # One view, no copy: q, k, v are strided slices of the fused projection.
    q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=n_head)
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = rearrange(y, "b h t d -> b t (h d)")
    return F.linear(y, c_proj["weight"], c_proj.get("bias"))
