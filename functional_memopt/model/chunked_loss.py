"""Cross-entropy over the tied output head that never materialises the full (N, V) logits.

``chunked_token_loss(x, wte, targets, mask, chunk=c)`` returns the ``(loss_sum, count)`` of the
plain path ``token_loss(F.linear(x, wte), targets, mask)``, but only one chunk of ``c`` tokens'
logits (``c x V`` in the compute dtype, plus their float32 working copy) is alive at a time.

As in Liger Kernel's fused linear cross-entropy, the gradients are computed during the forward,
chunk by chunk, while each chunk's logits are at hand: the loss is the last node of the graph, so
its backward only scales the stored ``d loss_sum / d x`` and ``d loss_sum / d wte`` by the
incoming scalar. That takes the same three matmuls per chunk as the plain path (forward logits,
gradient of x, gradient of the head) and no recompute. The stored gradients are the size of the
outputs the plain backward makes anyway (N x C and V x C), made a moment earlier. Without grad
mode (evaluation) only the loss is computed.

The function is an ``autograd.Function`` with a separate ``setup_context`` (the form that
``torch.func`` transforms accept), so it works under both gradient engines. It is first-order: a
second derivative through it is refused.

The head's gradient can also go straight into a float32 buffer (:class:`HeadGradSink`): the
training step's accumulator for the master ``wte``, with the factor the step multiplies the loss
sum by (loss scale / tokens). Each chunk's part is then added into that buffer while the forward
has it, scaled by the factor, and no (V, C) gradient of the head is ever allocated: not summed
over chunks, not rounded to the compute dtype, not cast back to float32 by the backward. The head
weight then gets no autograd gradient of its own. Only the autograd engine's in-place fold uses it
(train/step.py): there the buffer is the sum the step hands the optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batch import IGNORE_INDEX, token_weights

__all__ = ["HeadGradSink", "chunked_token_loss", "chunked_loss_bytes", "liger_chunk", "sink_rows"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class HeadGradSink:
    """Where the head's gradient goes instead of autograd: ``buffer += factor * d loss_sum / d weight``.

    Args:
        buffer: a float32 (or float64) tensor of the head weight's shape (V, C), added into in place.
        factor: a 0-d (or one-element) tensor, the gradient the loss sum will receive in the
            backward (the step differentiates ``loss_sum * factor``). The head's part is scaled
            by it in the forward, before that gradient is known, so the two must agree.
        fresh: the buffer holds no values yet (``torch.empty``): the first chunk writes its part
            over it instead of adding (the same values as adding into zeros), which spares a pass
            that fills (V, C) zeros; a loss over no tokens zeroes it. It is cleared once written.

    A plain object, not a pytree: the precision policy's casts pass it through untouched.
    """

    __slots__ = ("buffer", "factor", "fresh")

    def __init__(self, buffer: torch.Tensor, factor: torch.Tensor, *, fresh: bool = False):
        if buffer.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HeadGradSink: the buffer must be float32 or float64 (the step's accumulator), "
                             f"got {buffer.dtype}.")
        self.buffer, self.factor, self.fresh = buffer, factor.reshape(()).to(buffer.dtype), fresh


def sink_rows(chunk: int, vocab: int, width: int) -> int:
    """Rows of the head per product added into a sink from half precision: the (rows, C) product
    is the size of one chunk's logits (``chunk x V``), and at least 4096 rows (few, large matmuls)."""
    return min(vocab, max(4096, -(-chunk * vocab // width)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """x2 (N, C) and weight (V, C) in the compute dtype, targets (N,) int64, tokw (N,) per-token weights.

    With ``sink`` (a HeadGradSink) the head's gradient is added into ``sink.buffer`` in the
    forward and the weight gets none from the backward.
    """

    @staticmethod
    def forward(x2, weight, targets, tokw, chunk: int, with_grad: bool, sink=None):
        n, acc = x2.shape[0], tokw.dtype
        loss = torch.zeros((), dtype=acc, device=x2.device)
        grad_x = torch.empty_like(x2) if with_grad else None
        # The head's gradient is summed over chunks in the accumulation dtype and rounded once,
        # or added into the sink (already float32) scaled by its factor.
        direct = with_grad and sink is not None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x2.device) if with_grad and not direct else None
        rows = sink_rows(chunk, weight.shape[0], weight.shape[1])
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            xc, t, w = x2[s:e], targets[s:e], tokw[s:e]
            z = F.linear(xc, weight).to(acc)  # (c, V): compute-dtype logits, upcast as token_loss does
            valid = t != IGNORE_INDEX
            t_safe = torch.where(valid, t, 0)
            m = z.amax(dim=1, keepdim=True)
            zt = z.gather(1, t_safe.unsqueeze(1))
            z.sub_(m).exp_()  # in place: no second (c, V) buffer
            total = z.sum(dim=1, keepdim=True)
            # nll = -log_softmax[t] = (max - z_t) + log(sum exp(z - max)); an ignored target adds
            # exactly 0, as F.cross_entropy(ignore_index=...) does.
            nll = torch.where(valid.unsqueeze(1), (m - zt) + total.log(), 0.0).squeeze(1)
            loss += (nll * w).sum()
            if with_grad:
                # d loss_sum / d logits = (softmax - onehot(t)) * weight of the token.
                z.div_(total).mul_(w.unsqueeze(1))
                z.scatter_add_(1, t_safe.unsqueeze(1), (-w).unsqueeze(1))
                gz = z.to(x2.dtype)  # the gradient of the compute-dtype logits
                del z
                torch.mm(gz, weight, out=grad_x[s:e])
                # The (C, V) form of the same product: addmm_ into a (V, C) target through
                # transposed operands allocated two (V, C) temporaries (measured); this none.
                if direct:
                    # A fresh buffer's first chunk is written, not added (0 + p is p, so the same values).
                    if gz.dtype == acc:
                        sink.buffer.t().addmm_(xc.t(), gz.mul_(sink.factor), beta=0 if sink.fresh else 1)
                    else:  # a half product of `rows` head rows at a time, scaled and added in float32
                        for r in range(0, weight.shape[0], rows):
                            part = gz[:, r:r + rows].t() @ xc
                            if sink.fresh:
                                sink.buffer[r:r + rows].copy_(part).mul_(sink.factor)
                            else:
                                sink.buffer[r:r + rows].addcmul_(part, sink.factor)
                            del part  # one product alive at a time
                    sink.fresh = False
                elif gz.dtype == acc:
                    grad_w.t().addmm_(xc.t(), gz)
                else:
                    grad_w.t().add_(xc.t() @ gz)  # half matmul (float32 inside), float32 sum
                del gz  # nothing of this chunk outlives it
            else:
                del z
            del valid, t_safe, m, zt, total, nll
        count = tokw.sum()
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return loss, count, grad_x, grad_w

    @staticmethod
    def setup_context(ctx, inputs, output):
        with_grad = inputs[5]
        _, count, grad_x, grad_w = output
        ctx.mark_non_differentiable(*(t for t in (count, grad_x, grad_w) if t is not None))
        ctx.set_materialize_grads(False)  # no zero (N, C) and (V, C) gradients for the side outputs
        ctx.with_grad = with_grad
        ctx.direct = grad_w is None
        if with_grad:
            ctx.save_for_backward(grad_x, *(() if grad_w is None else (grad_w,)))

    @staticmethod
    def backward(ctx, g_loss, _g_count, _g_x, _g_w):
        if not ctx.with_grad:
            raise RuntimeError("chunked_token_loss: the loss was computed without gradients (grad mode off or "
                               "inputs not requiring grad); compute it with grad mode on to differentiate it.")
        grad_x, *grad_w = ctx.saved_tensors
        if g_loss is None:
            return None, None, None, None, None, None, None
        if g_loss.requires_grad:
            raise RuntimeError("chunked_token_loss: its gradient is first-order only (no create_graph, no "
                               "nested torch.func.grad); use the plain loss (loss_chunk=None) for higher derivatives.")
        # Under a sink the head's gradient is already in its buffer, scaled by the factor.
        return grad_x * g_loss, None if ctx.direct else grad_w[0] * g_loss, None, None, None, None, None


def chunked_token_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       mask: torch.Tensor | None = None, *, chunk: int,
                       head_grad: HeadGradSink | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of ``F.linear(x, weight)`` and its token count, ``chunk`` tokens at a time.

    Args:
        x: (B, T, C) final features in the compute dtype.
        weight: (V, C) output head (the tied ``wte``) in the same dtype.
        targets: (B, T) int64 next-token ids; IGNORE_INDEX marks positions not counted.
        mask: optional (B, T) loss mask, nonzero where the token counts (not differentiated).
        chunk: tokens per chunk, an int >= 1 (one larger than B * T is one chunk).
        head_grad: a :class:`HeadGradSink` that takes the head's gradient, scaled by its factor,
            in the forward; ``weight`` then gets no gradient from the backward (pass it detached).
            The loss sum's incoming gradient must be the sink's factor.

    Returns:
        (loss_sum, count): 0-d float32 tensors (float64 for float64 inputs), as ``token_loss``.

    Example:
        >>> x, w = torch.randn(2, 5, 8), torch.randn(11, 8)
        >>> t = torch.randint(0, 11, (2, 5))
        >>> loss_sum, count = chunked_token_loss(x, w, t, chunk=3)
        >>> float(count)
        10.0
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_token_loss: chunk must be an int >= 1 (tokens per chunk), got {chunk!r}; "
                         "pass e.g. chunk=256, or loss_chunk=None for the plain loss ('cce' for cut-cross-entropy).")
    check_head_inputs("chunked_token_loss", x, weight, targets)
    if x.dtype not in _FLOATS or weight.dtype != x.dtype:
        raise ValueError(f"chunked_token_loss: x and weight must share one floating dtype, got {x.dtype} and "
                         f"{weight.dtype}; cast both to the compute dtype.")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, x.shape[-1])
    tgt = targets.reshape(-1)
    tokw = token_weights(tgt, None if mask is None else mask.detach().reshape(-1), dtype=acc)
    if head_grad is not None and tuple(head_grad.buffer.shape) != tuple(weight.shape):
        raise ValueError(f"chunked_token_loss: head_grad's buffer must have the weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(head_grad.buffer.shape)}.")
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or head_grad is not None)
    loss, count, _, _ = _ChunkedCrossEntropy.apply(x2, weight, tgt, tokw, chunk, with_grad,
                                                   head_grad if with_grad else None)
    if head_grad is not None and head_grad.fresh:  # nothing was written (no tokens, or no gradient asked)
        head_grad.buffer.zero_()
        head_grad.fresh = False
    return loss, count


def check_head_inputs(caller: str, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise a ValueError naming ``caller`` unless x is (..., C), weight (V, C) and targets x's shape but C."""
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{caller}: expected x (B, T, C) and weight (V, C) with the same C, got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}.")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{caller}: targets must have shape {tuple(x.shape[:-1])} (one per token of x), got "
                         f"{tuple(targets.shape)}.")


def liger_chunk(n_tokens: int, vocab: int, width: int) -> int:
    """Liger Kernel's chunk: the power of two near ``N / ceil(V / C)`` tokens, whose logits are about as big as x.

    Example:
        >>> liger_chunk(2048, 50257, 768)
        32
    """
    factor = -(-vocab // width)
    chunk = -(-n_tokens // factor)
    return min(1 << max(0, (chunk - 1).bit_length()), max(1, n_tokens))


def chunked_loss_bytes(n_tokens: int, chunk: int, vocab: int, width: int, *, compute_bytes: int,
                       direct: bool = False) -> dict:
    """Bytes the chunked loss allocates for ``n_tokens`` tokens, read off :class:`_ChunkedCrossEntropy`.

    Returns:
        ``{"stored": ..., "peak": ...}``: the gradients kept from its forward to its backward
        (x's N*C and the head's V*C, in the compute dtype), and the most it holds at once beyond
        its inputs, forward and backward together (what a memory tracker sees of it).

    In the forward, grad_x (N*C*h), the head's gradient summed in the accumulation dtype (V*C*a)
    and the token weights (N*a) are alive while one chunk's logits are: c*V*a for float32 and
    float64 (the same buffer throughout), c*V*(h + a) for half dtypes (the compute-dtype logits
    and their float32 copy, or that copy and its compute-dtype gradient, or that gradient and its
    (C, V) product with x, summed into the float32 head gradient). A half head gradient
    is cast once at the end (V*C*(a + h) for a moment). The backward scales the stored
    gradients by the incoming scalar into new tensors: 2*(N*C + V*C)*h.

    ``direct`` (a HeadGradSink takes the head's gradient): no (V, C) buffer at all. The forward
    holds grad_x, the token weights and one chunk: its float32 logits and their compute-dtype
    gradient, or, for half dtypes, that gradient and a (rows, C) product of ``sink_rows`` head
    rows (the in-place, scaled add into the float32 sink widens it element by element).
    The backward scales grad_x alone: 2*N*C*h.

    Example:
        >>> chunked_loss_bytes(2048, 32, 50257, 768, compute_bytes=2)["stored"] == (2048 + 50257) * 768 * 2
        True
    """
    h = compute_bytes
    a = 8 if h == 8 else 4
    n, c, nc, vc = n_tokens, min(chunk, n_tokens), n_tokens * width, vocab * width
    if direct:
        rows = sink_rows(c, vocab, width)
        per_chunk = c * vocab * a if h == a else max(c * vocab * (h + a), (c * vocab + rows * width) * h)
        return {"stored": nc * h, "peak": max(nc * h + n * a + per_chunk, 2 * nc * h)}
    per_chunk = c * vocab * a if h == a else max(c * vocab * (h + a), c * vocab * h + vc * h)
    forward = nc * h + vc * a + n * a + per_chunk
    cast = nc * h + vc * (a + h) + n * a if h != a else 0
    backward = 2 * (nc + vc) * h
    return {"stored": (nc + vc) * h, "peak": max(forward, cast, backward)}
