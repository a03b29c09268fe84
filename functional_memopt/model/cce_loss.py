"""The head's cross-entropy through Cut Cross-Entropy's fused CUDA kernels: ``loss_chunk="cce"``.

The optional ``cut-cross-entropy`` package (Apple's Cut Cross-Entropy) computes the head matmul,
the log-sum-exp and the cross-entropy in Triton kernels that keep each block of logits in on-chip
memory: neither its forward nor its backward writes an (N, V) tensor to device memory, and no
Python loop over chunks runs. ``pip install cut-cross-entropy`` (Linux; it brings Triton).

It sits behind the chunked loss's setting: ``loss_chunk="cce"`` instead of a chunk size. The loss
is the token-weighted sum the steps expect. The kernels return each token's loss
(``reduction="none"``, 0 for IGNORE_INDEX), which :func:`cce_token_loss` weights by
``token_weights`` (a mask may be fractional) and sums in float32. The package's gradient filter
(``filter_eps``, which skips vocabulary blocks whose softmax is below a threshold, and so changes
the gradients) is off: the gradients are the plain loss's, up to the kernels' rounding.

When it fits:
- CUDA, with a half compute dtype (mixed_bf16, mixed_fp16): the package's backward takes fp16 and
  bf16 features only. Anything else is a ValueError naming the setting to use instead.
- ``engine="autograd"`` and no ``compile=``: its autograd.Function has no ``setup_context``, so
  ``torch.func`` cannot transform it, and its kernels are not traced.
- The head's gradient comes back from its backward as a (V, C) tensor in the compute dtype, so the
  step's HeadGradSink (the chunked loss adding the head's gradient straight into the float32 sum)
  is not used. The ledger (``predict_memory(..., loss_chunk="cce")``) models that: at GPT-2's
  shape it costs more memory than the chunked loss with its sink, which is why ``--loss-chunk
  auto`` keeps the chunked loss and ``cce`` is chosen by name, for speed on a GPU.

``impl="torch_compile"`` runs the package's own reference implementation instead (any device,
logits materialised): the tests use it to check this wiring on the CPU.
"""

from __future__ import annotations

import importlib.util

import torch

from ..data.batch import IGNORE_INDEX, token_weights
from .chunked_loss import check_head_inputs

__all__ = ["CCE", "CCE_DTYPES", "cce_available", "cce_token_loss", "cce_loss_bytes", "check_cce"]

CCE = "cce"  # the loss_chunk value that selects this route
CCE_DTYPES = (torch.float16, torch.bfloat16)  # the compute dtypes its backward takes


def cce_available() -> bool:
    """Whether the cut-cross-entropy package is installed (it is imported only when used)."""
    return importlib.util.find_spec("cut_cross_entropy") is not None


def check_cce(caller: str, *, engine: str = "autograd", compiled: bool = False,
              compute_dtype: torch.dtype | None = None) -> None:
    """Raise the error that says why ``loss_chunk="cce"`` cannot run here, if it cannot."""
    if not cce_available():
        raise ImportError(f"{caller}: loss_chunk='cce' needs the cut-cross-entropy package: pip install "
                          "cut-cross-entropy (Linux with CUDA; it brings Triton), or pass an integer loss_chunk "
                          "(the chunked loss, on any device).")
    if engine != "autograd":
        raise ValueError(f"{caller}: loss_chunk='cce' needs engine='autograd' (cut-cross-entropy's autograd "
                         f"Function cannot be transformed by torch.func), got engine={engine!r}; use an integer "
                         "loss_chunk with the func engine.")
    if compiled:
        raise ValueError(f"{caller}: loss_chunk='cce' runs cut-cross-entropy's own kernels eagerly; turn compile "
                         "off, or pass an integer loss_chunk to compile the chunked loss.")
    if compute_dtype is not None and compute_dtype not in CCE_DTYPES:
        raise ValueError(f"{caller}: loss_chunk='cce' needs a half compute dtype (cut-cross-entropy's backward "
                         f"takes fp16 and bf16 features), got {compute_dtype}; use policy mixed_bf16 or "
                         "mixed_fp16, or an integer loss_chunk.")


def cce_token_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   mask: torch.Tensor | None = None, *, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of ``F.linear(x, weight)`` and its token count, by cut-cross-entropy.

    Args:
        x: (B, T, C) final features in the compute dtype (fp16 or bf16 for the CUDA kernels).
        weight: (V, C) output head (the tied ``wte``) in the same dtype.
        targets: (B, T) int64 next-token ids; IGNORE_INDEX marks positions not counted.
        mask: optional (B, T) loss mask, nonzero where the token counts (not differentiated).
        impl: None for the package's CUDA kernels ("cce"); "torch_compile" for its reference
            implementation, which runs anywhere and materialises the logits (for tests).

    Returns:
        (loss_sum, count): 0-d float32 tensors, as ``token_loss``.
    """
    check_head_inputs("cce_token_loss", x, weight, targets)
    if weight.dtype != x.dtype:
        raise ValueError(f"cce_token_loss: x and weight must share one dtype, got {x.dtype} and {weight.dtype}.")
    if impl is None:
        if x.device.type != "cuda":
            raise ValueError(f"cce_token_loss: loss_chunk='cce' runs cut-cross-entropy's CUDA kernels, but the "
                             f"features are on {x.device}; pass an integer loss_chunk (the chunked loss) there.")
        check_cce("cce_token_loss", compute_dtype=x.dtype)
        impl = "cce"
    elif impl != "torch_compile":
        raise ValueError(f"cce_token_loss: impl must be None (the CUDA kernels) or 'torch_compile', got {impl!r}.")
    from cut_cross_entropy import linear_cross_entropy

    x2, tgt = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    kwargs = {"filter_eps": None} if impl == "cce" else {}
    nll = linear_cross_entropy(x2, weight, tgt, ignore_index=IGNORE_INDEX, reduction="none", impl=impl, **kwargs)
    tokw = token_weights(tgt, None if mask is None else mask.detach().reshape(-1), dtype=torch.float32)
    return (nll.reshape(-1).float() * tokw).sum(), tokw.sum()


def cce_loss_bytes(n_tokens: int, vocab: int, width: int, *, compute_bytes: int) -> dict:
    """Bytes cut-cross-entropy's kernels allocate for ``n_tokens`` tokens, read off the package's code.

    Returns:
        ``{"stored": ..., "peak": ...}``: what its forward keeps for the backward beyond its inputs
        (the float32 log-sum-exp and the valid tokens' int32 indices), and the most it holds at
        once beyond its inputs.

    The forward makes the valid tokens' indices (int64 by ``nonzero``, then int32), the float32
    log-sum-exp and each token's loss, scattered into an (N,) float32 tensor, which the weighting
    multiplies into one more. The backward makes the features' gradient (N*C) and the head's
    (V*C), both in the compute dtype, zeroed, and their int32 lock tables (about N + V entries),
    while the stored (N,) tensors are alive.

    Example:
        >>> cce_loss_bytes(2048, 50257, 768, compute_bytes=2)["peak"] == (2048 + 50257) * (768 * 2 + 4) + 2048 * 16
        True
    """
    n, h = n_tokens, compute_bytes
    stored = n * (4 + 4)  # log-sum-exp and int32 indices
    forward = stored + n * 8 + 3 * n * 4  # + nonzero's int64, per-token loss, its scatter, the weighted product
    # + de and dc, their locks; the incoming gradient and its weighting (N float32 each)
    backward = stored + (n + vocab) * (width * h + 4) + n * 8
    return {"stored": stored, "peak": max(forward, backward)}
