"""Causal self-attention with one fused QKV projection, the masks it understands, and its kernel.

The only mask built by default is none at all: with a purely causal pattern the SDPA kernel is
called with ``is_causal=True`` so no (T, T) tensor exists and the flash / memory-efficient kernels
can serve. Padding (key) masks and document (segment) masks add a boolean (B, 1, T, T) mask.

Two kernels compute the same attention. ``"sdpa"`` is ``F.scaled_dot_product_attention`` (flash on
CUDA and on the CPU): it keeps a float32 log-sum-exp per head and token, never the (T, T) scores.
``"math"`` is two matmuls and a softmax: it saves the (B, h, T, T) probabilities in the compute
dtype for the backward pass. On the CPU in bfloat16 the flash kernel's backward is slow at short
sequences (``benchmarks/attention_kernels.py``: with the projections, the math kernel's forward and
backward take 0.47x SDPA's at T = 128, head width 32, and 0.63x at T = 512; in float32 and float16
it is not faster), so ``"auto"`` (ModelConfig's default) picks ``"math"`` there when T <= 4 x the
head width: the saved probabilities (h * T per token) are then at most 4C per token, a quarter of
what a block saves anyway (8C + 2H = 16C at the default MLP ratio). Everywhere else, ``"auto"`` is
``"sdpa"``. The memory ledger counts the kernel that runs (``memory/ledger.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .config import ATTENTION_KERNELS

__all__ = ["causal_attention", "build_attention_mask", "positions_from_segments", "attention_kernel"]

MATH_MAX_SEQ_PER_HEAD_WIDTH = 4  # "auto" picks "math" (CPU, bfloat16) while T <= 4 x head width


def attention_kernel(kernel: str, seq_len: int, head_dim: int, dtype: torch.dtype, device) -> str:
    """The kernel ``kernel`` stands for: "sdpa" or "math" as given; "auto" by device, dtype and shape.

    Example:
        >>> [attention_kernel("auto", 128, 32, dtype, "cpu") for dtype in (torch.bfloat16, torch.float32)]
        ['math', 'sdpa']
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel: kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}.")
    if kernel != "auto":
        return kernel
    short = seq_len <= MATH_MAX_SEQ_PER_HEAD_WIDTH * head_dim
    return "math" if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and short else "sdpa"


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v; what autograd saves is listed in the module docstring.

    The matmuls copy their strided q, k, v into contiguous ones and save those (the fused qkv
    itself is then saved by no one, so this costs what SDPA's saved q, k, v cost); softmax and
    the second matmul save the one probability tensor; the additive bias (0 or -inf), scaled
    add and causal pattern save nothing.
    """
    T = q.shape[-2]
    if mask is None:
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    else:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    scores = torch.add(bias, torch.matmul(q, k.transpose(-1, -2)), alpha=q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


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
    kernel: str = "sdpa",
) -> torch.Tensor:
    """Multi-head causal self-attention with one fused QKV matmul.

    Args:
        x: (B, T, C) input.
        c_attn: {"weight": (3C, C), "bias": (3C,) optional}, the fused Q, K, V projection.
        c_proj: {"weight": (C, C), "bias": (C,) optional}, the output projection.
        n_head: heads; C must be divisible by it.
        mask: None for plain causal attention, else a bool (B, 1, T, T) from build_attention_mask.
        kernel: "sdpa", "math" or "auto" (see :func:`attention_kernel`); the same attention either way.

    Returns:
        (B, T, C) output.
    """
    qkv = F.linear(x, c_attn["weight"], c_attn.get("bias"))  # (B, T, 3C)
    # One view, no copy: q, k, v are strided slices of the fused projection.
    q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=n_head)
    if attention_kernel(kernel, q.shape[-2], q.shape[-1], q.dtype, q.device) == "math":
        y = _math_attention(q, k, v, mask)
    elif mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = rearrange(y, "b h t d -> b t (h d)")
    return F.linear(y, c_proj["weight"], c_proj.get("bias"))
