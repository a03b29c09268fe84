"""A GPT-2 style model as pure functions over a nested dict of tensors.

Pre-norm blocks (x + attn(ln_1(x)); x + mlp(ln_2(x))), a final layer norm, GELU (tanh by default), and one
tied leaf ``wte`` that is both the token embedding and the output head. Linear weights are stored
(out, in) as ``F.linear`` wants them. Nothing here mutates ``params``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .._tree import tree_cast
from ..data.batch import IGNORE_INDEX, token_weights
from .attention import build_attention_mask, causal_attention, positions_from_segments
from .cce_loss import CCE, cce_token_loss
from .chunked_loss import HeadGradSink, chunked_token_loss
from .config import ModelConfig
from .layout import check_params
from .remat import RematSpec, remat_layers
from .remat import remat as rematerialise

__all__ = ["apply", "final_features", "loss_fn", "token_loss", "block_apply", "check_tokens", "activate"]


def check_tokens(tokens: torch.Tensor, cfg: ModelConfig) -> None:
    """Raise TypeError / ValueError for tokens that ``apply`` cannot take."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"apply: tokens must be a torch.Tensor of int64 ids, got {type(tokens).__name__}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(
            f"apply: tokens must be integer ids (int64), got dtype {tokens.dtype}; "
            "convert with tokens.long() if the values are whole numbers."
        )
    if tokens.dim() != 2:
        raise ValueError(f"apply: tokens must have shape (B, T), got {tuple(tokens.shape)}.")
    T = tokens.shape[1]
    if T > cfg.block_size:
        raise ValueError(
            f"apply: sequence length {T} is longer than block_size {cfg.block_size}; "
            "truncate the sequence or use a config with a larger block_size."
        )
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"apply: token id {bad} is outside [0, vocab_size={cfg.vocab_size}); "
                "check the tokenizer matches the model's vocabulary."
            )


def _layer_norm(x: torch.Tensor, p: dict, eps: float) -> torch.Tensor:
    # CPU and CUDA layer_norm kernels accumulate mean and variance in float32 for half inputs.
    return F.layer_norm(x, (x.shape[-1],), p["weight"], p.get("bias"), eps)


# GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), is x * sigmoid(2u)
# exactly (1 + tanh(u) = 2 sigmoid(2u)). Compiled for the CPU, inductor fuses that form into one
# loop whose exp vectorizes: forward and backward take 0.43-0.50x the time of torch's tanh GELU
# compiled (tiny and small MLPs, fp32 and bf16, one thread: benchmarks/activation_bench.py).
_GELU_TANH_2K = 2 * math.sqrt(2 / math.pi)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's GELU: "gelu" (erf) or "gelu_tanh" (GPT-2's), the latter as x * sigmoid(2u) when compiled for the CPU.

    Example:
        >>> activate(torch.tensor([0.0, 1.0]), "gelu_tanh")
        tensor([0.0000, 0.8412])
    """
    if activation != "gelu_tanh":
        return F.gelu(x)
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return x * torch.sigmoid(_GELU_TANH_2K * (x + 0.044715 * (x * x * x)))
    return F.gelu(x, approximate="tanh")


def _mlp(x: torch.Tensor, p: dict, activation: str) -> torch.Tensor:
    h = activate(F.linear(x, p["c_fc"]["weight"], p["c_fc"].get("bias")), activation)
    return F.linear(h, p["c_proj"]["weight"], p["c_proj"].get("bias"))


def block_apply(block: dict, x: torch.Tensor, *, cfg: ModelConfig, mask: torch.Tensor | None) -> torch.Tensor:
    """One pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    eps = cfg.layer_norm_eps
    a = block["attn"]
    x = x + causal_attention(_layer_norm(x, block["ln_1"], eps), a["c_attn"], a["c_proj"], cfg.n_head, mask=mask,
                             kernel=cfg.attention)
    return x + _mlp(_layer_norm(x, block["ln_2"], eps), block["mlp"], cfg.activation)


def _block_fn(block, x, *, cfg, mask, compute_dtype):
    # Cast just in time: this block's params become compute-dtype copies here, and under remat
    # inside the recomputed region, so at most one block's copy is alive at a time.
    if compute_dtype is not None:
        block = tree_cast(block, compute_dtype)
    return block_apply(block, x, cfg=cfg, mask=mask)


def _features_and_head(params, tokens, cfg, *, attention_mask, segment_ids, remat, compute_dtype,
                       direct_head: bool = False):
    """(B, T, C) features after the final layer norm, and the head's weight (wte, cast once).

    ``direct_head``: the head's gradient goes elsewhere (a HeadGradSink), so the head gets a
    detached copy, and the embeddings read the master tables and cast the rows they gather (the
    same values): their gradients reach the masters as dense float32 tables, with no
    compute-dtype table of gradients beside them.
    """
    T = tokens.shape[1]
    if segment_ids is not None:
        pos = positions_from_segments(segment_ids)
    else:
        pos = torch.arange(T, device=tokens.device)
    cast = (lambda t: t) if compute_dtype is None else (lambda t: tree_cast(t, compute_dtype))
    if direct_head:
        wte = cast(params["wte"].detach())
        x = cast(F.embedding(tokens, params["wte"]) + F.embedding(pos, params["wpe"]))  # (B, T, C)
    else:
        wte = cast(params["wte"])  # one copy serves the embedding and the head, so their gradients add up
        x = F.embedding(tokens, wte) + F.embedding(pos, cast(params["wpe"]))  # (B, T, C)
    mask = build_attention_mask(T, attention_mask=attention_mask, segment_ids=segment_ids, device=tokens.device)
    fn = functools.partial(_block_fn, cfg=cfg, mask=mask, compute_dtype=compute_dtype)
    chosen = remat_layers(remat, cfg.n_layer)
    for i, block in enumerate(params["h"]):
        x = rematerialise(fn, block, x) if i in chosen else fn(block, x)
    return _layer_norm(x, cast(params["ln_f"]), cfg.layer_norm_eps), wte


def apply(
    params: dict,
    tokens: torch.Tensor,
    cfg: ModelConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    remat: RematSpec = None,
    compute_dtype: torch.dtype | None = None,
    check: bool = True,
) -> torch.Tensor:
    """The model's logits for ``tokens``; a pure function of ``params``.

    Args:
        params: tree from :func:`init_params` (any floating dtype).
        tokens: (B, T) int64 ids in [0, vocab_size), T <= block_size.
        cfg: the config the params were made for.
        attention_mask: optional (B, T), 1 for real tokens and 0 for padding keys.
        segment_ids: optional (B, T) document ids for packed rows; attention stays inside a
            document and positions restart at each document's first token.
        remat: which blocks to rematerialise (see :func:`remat_layers`).
        compute_dtype: run in this dtype, casting each block's params just before the block
            (None: in the params' own dtype).
        check: validate params and tokens (costs a host sync for the token range).

    Returns:
        (B, T, vocab_size) logits, in the compute dtype (the params' dtype by default).

    Example:
        >>> from functional_memopt import init_params
        >>> cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
        >>> apply(init_params(cfg), torch.zeros(2, 8, dtype=torch.long), cfg).shape
        torch.Size([2, 8, 256])
    """
    if check:
        check_tokens(tokens, cfg)
        check_params(params, cfg)
    x, wte = _features_and_head(params, tokens, cfg, attention_mask=attention_mask, segment_ids=segment_ids,
                                remat=remat, compute_dtype=compute_dtype)
    # Weight tying: the head is the embedding matrix itself (Press & Wolf 2017); no copy is made.
    return F.linear(x, wte)  # (B, T, V)


def final_features(
    params: dict,
    tokens: torch.Tensor,
    cfg: ModelConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    remat: RematSpec = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Everything of :func:`apply` before the head: (B, T, C) after the final layer norm.

    Reads only wte (as the embedding), wpe, h and ln_f, so a variant head (e.g. an untied one in
    the memory ledger's baseline) can be put on top. No input checks.
    """
    return _features_and_head(params, tokens, cfg, attention_mask=attention_mask, segment_ids=segment_ids,
                              remat=remat, compute_dtype=compute_dtype)[0]


def loss_fn(
    params: dict,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    cfg: ModelConfig,
    *,
    mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    remat: RematSpec = None,
    compute_dtype: torch.dtype | None = None,
    loss_chunk: int | str | None = None,
    head_grad: HeadGradSink | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy in float32 and the number of tokens counted.

    Returning the sum and the count (not the mean) lets accumulation normalise by the total token
    count over all micro-batches, which a mean of per-micro-batch means gets wrong when the counts
    differ.

    Args:
        params, tokens, cfg, attention_mask, segment_ids, remat, compute_dtype, check: as for
            :func:`apply`.
        targets: (B, T) next-token ids; IGNORE_INDEX marks positions not counted.
        mask: optional (B, T) loss mask, nonzero where the token counts.
        loss_chunk: tokens per chunk of the head and cross-entropy (``chunked_token_loss``): the
            (B, T, V) logits are never materialised. None computes them whole; "cce" uses the
            cut-cross-entropy package's fused CUDA kernels (``model.cce_loss``).
        head_grad: with ``loss_chunk``, a HeadGradSink that takes the tied head's gradient in the
            forward (the training step's accumulator for ``wte``); ``wte`` then gets only the
            embedding's gradient from the backward.

    Returns:
        (loss_sum, count): 0-d float32 tensors (float64 when the params are float64).
    """
    if check:
        check_tokens(tokens, cfg)
        check_params(params, cfg)
    if head_grad is not None and (loss_chunk is None or loss_chunk == CCE):
        raise ValueError("loss_fn: head_grad needs the chunked loss (pass an integer loss_chunk); the plain loss "
                         "and cut-cross-entropy make the head's gradient in the backward.")
    x, wte = _features_and_head(params, tokens, cfg, attention_mask=attention_mask, segment_ids=segment_ids,
                                remat=remat, compute_dtype=compute_dtype, direct_head=head_grad is not None)
    if loss_chunk == CCE:
        return cce_token_loss(x, wte, targets, mask)
    if loss_chunk is not None:
        return chunked_token_loss(x, wte, targets, mask, chunk=loss_chunk, head_grad=head_grad)
    return token_loss(F.linear(x, wte), targets, mask)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
    """Summed cross-entropy of (B, T, V) logits and the count of tokens it covers.

    Targets equal to IGNORE_INDEX and positions where ``mask`` is 0 are not counted.
    """
    # Half-precision logits are upcast so the log-softmax and the sum run in float32; float64
    # stays float64 (the property tests run in it).
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    nll = F.cross_entropy(
        logits.to(acc).flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )  # (B*T,), float32
    weight = token_weights(targets, mask, dtype=acc)
    return (nll * weight).sum(), weight.sum()
