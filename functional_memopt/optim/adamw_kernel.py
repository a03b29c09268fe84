"""The arithmetic of one AdamW update over flat leaf lists, as few passes over memory as it allows.

:func:`functional_memopt.adamw` validates, holds the hyper-parameters and the state, and calls
:func:`adamw_update`. Leaves are grouped by route, decay, device and dtype, and each group runs:

- **fused** (CPU and CUDA; g, mu and nu contiguous and of one floating dtype): one
  ``torch._fused_adamw_`` pass per leaf, the kernel of ``torch.optim.AdamW(fused=True)``. The
  kernel steps a parameter in place, so it steps a buffer: a copy of the params where the leaf
  decays (the update is then ``buffer - params``, exact whenever the new and old values are
  within a factor of two of each other, so ``params + update`` is the kernel's result bit for
  bit), zeros where it does not (the buffer then is the update). Pure, this allocates the new
  moments and the buffer; donated, one leaf's buffer at a time, the update written over the
  (donated) gradient: the working memory is the largest leaf.

  With ``apply`` (``adamw(...).apply``, what the train step calls) the kernel steps the params
  themselves, donated, or one copy of them, pure: that is ``torch.optim.AdamW(fused=True)``'s step
  bit for bit, with no buffer, no update tree and no ``params + updates`` pass (timed against the
  update route and torch's optimizers by ``benchmarks/optimizer_update.py``).
- **foreach** (elsewhere, and under ``torch.compile``): ``torch._foreach_*`` ops in the order of
  torch's multi-tensor AdamW with ``capturable=True`` (the step size folded into the denominator,
  so every scalar can stay a device tensor).

Both routes run the same arithmetic with and without ``donate``, so the two are bit-identical;
``apply`` skips the subtraction of the params, so it is torch's step where the update path is
within one rounding of it.
"""

from __future__ import annotations

import torch

__all__ = ["adamw_update"]

_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(g: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, p: torch.Tensor | None) -> bool:
    """Whether the fused kernel can step this leaf (it walks raw memory, hence the contiguity)."""
    same = all(x.dtype == g.dtype and x.device == g.device for x in (mu, nu) + (() if p is None else (p,)))
    return (same and g.device.type in _FUSED_DEVICES and g.dtype in _FUSED_DTYPES and g.numel() > 0
            and g.is_contiguous() and mu.is_contiguous() and nu.is_contiguous())


def adamw_update(g: list, mu: list, nu: list, p: list | None, decayed: set, count: torch.Tensor, lr, *,
                 b1: float, b2: float, eps: float, weight_decay: float, donate: bool, apply: bool = False) -> tuple:
    """One AdamW update of flat leaf lists: ``(updates, mu, nu)``, or with ``apply`` ``(params, mu, nu)``.

    Args:
        g: the gradient leaves: read only, the updates coming back in new buffers; with
            ``donate`` (the caller gives them up) the fused route writes the updates over them.
            With ``apply`` they are only read.
        mu: first moments, like ``g``; with ``donate``, updated in place.
        nu: second moments, like ``g``; with ``donate``, updated in place.
        p: the param leaves (read only unless ``apply`` and ``donate``), or None when no leaf
            decays and ``apply`` is off.
        decayed: indices of the leaves that get weight decay.
        count: () int64, the count *after* this update (t in the bias corrections).
        lr: the learning rate, a Python float or a 0-d float64 tensor on the params' device.
        b1, b2, eps, weight_decay: as in :func:`functional_memopt.adamw`.
        donate: update ``mu`` and ``nu`` (and with ``apply`` the params) in place, and return them.
        apply: return the stepped params instead of the updates. The fused kernel then steps the
            params themselves (or, pure, one copy of them): the result is torch's fused AdamW step
            bit for bit, with no update tree and no ``params + updates`` pass.

    Returns:
        ``(updates, mu, nu)``: lists of the new leaves, with ``p + updates`` the stepped params;
        with ``apply``, ``(params, mu, nu)``.

    Example:
        >>> g, z = [torch.ones(2)], [torch.zeros(2)]
        >>> u, mu, nu = adamw_update(g, z, [torch.zeros(2)], None, set(), torch.tensor(1), 0.1,
        ...                          b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, donate=False)
        >>> u[0]
        tensor([-0.1000, -0.1000])
    """
    if apply and p is None:
        raise ValueError("adamw_update: apply=True steps the params, so it needs them; pass p.")
    # torch.compile cannot functionalize the kernel's in-place writes: it traces the foreach route.
    eager = not torch.compiler.is_compiling()
    groups: dict = {}
    for i, x in enumerate(g):
        # The kernel walks p (or its copy) when it decays or when it steps the params (apply).
        walked = p is not None and (i in decayed or apply)
        fused = eager and _fusable(x, mu[i], nu[i], p[i] if walked else None)
        groups.setdefault((fused, i in decayed, x.device, x.dtype), []).append(i)
    u, mu, nu = list(g), list(mu), list(nu)
    hp = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, donate=donate)
    for (fused, decay, device, dtype), idx in groups.items():
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        route = (_fused_apply if apply else _fused) if fused else _foreach
        res = route(pick(g), pick(mu), pick(nu), pick(p) if decay or apply else None, count.to(device), lr,
                    decay=decay, apply=apply, **hp)
        for i, uu, m, v in zip(idx, *res):
            u[i], mu[i], nu[i] = uu, m, v
    return u, mu, nu


def _kernel_args(g, count, lr, *, b1, b2, eps, weight_decay, decay) -> tuple:
    """The fused kernel's per-leaf steps and keyword arguments."""
    if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
        lr = lr.to(device=g[0].device, dtype=torch.float32)  # the CUDA kernel reads a float32 lr
    # The kernel reads the step (after this update) from a float32 tensor per leaf, as torch keeps it.
    step = count.to(torch.float32)
    hp = dict(lr=lr, beta1=b1, beta2=b2, weight_decay=weight_decay if decay else 0.0, eps=eps,
              amsgrad=False, maximize=False)
    return step, hp


def _fused_apply(g, mu, nu, p, count, lr, *, b1, b2, eps, weight_decay, donate, decay, apply):
    """The fused kernel stepping the params: in place when donated, else a copy of params and moments.

    This is ``torch.optim.AdamW(fused=True)``'s step itself: no working buffer, no update tree.
    """
    step, hp = _kernel_args(g, count, lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decay=decay)
    if not donate:
        fmt = torch.contiguous_format
        p = [x.clone(memory_format=fmt) for x in p]
        mu, nu = [x.clone() for x in mu], [x.clone() for x in nu]
    torch._fused_adamw_(p, g, mu, nu, [], [step] * len(g), **hp)
    return p, mu, nu


def _fused(g, mu, nu, p, count, lr, *, b1, b2, eps, weight_decay, donate, decay, apply):
    """The fused kernel on a working buffer; ``p`` is None for leaves that do not decay.

    Pure: one multi-tensor pass over buffers the size of all the leaves. Donated: leaf by leaf,
    each leaf's buffer freed once its update is written over its gradient (the step's own, given
    up with ``donate``), so the working memory is the largest leaf, not a second copy of the model.
    """
    step, hp = _kernel_args(g, count, lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decay=decay)
    fmt = torch.contiguous_format
    if donate:
        for i in range(len(g)):
            buf = p[i].clone(memory_format=fmt) if p is not None else torch.zeros_like(g[i], memory_format=fmt)
            torch._fused_adamw_([buf], [g[i]], [mu[i]], [nu[i]], [], [step], **hp)
            if p is not None:  # the buffer held the params: the update is what the kernel added
                torch.sub(buf, p[i], out=g[i])
            else:
                g[i].copy_(buf)
            del buf
        return g, mu, nu
    mu, nu = [x.clone() for x in mu], [x.clone() for x in nu]
    buf = ([x.clone(memory_format=fmt) for x in p] if p is not None
           else [torch.zeros_like(x, memory_format=fmt) for x in g])
    torch._fused_adamw_(buf, g, mu, nu, [], [step] * len(g), **hp)
    if p is not None:  # the buffer held the params: the update is what the kernel added
        torch._foreach_sub_(buf, p)
    return buf, mu, nu


def _foreach(g, mu, nu, p, count, lr, *, b1, b2, eps, weight_decay, donate, decay, apply):
    """Multi-tensor ops over leaves of one device and dtype.

    ``p`` is None where none decays and nothing is applied. With ``apply`` the result is the
    stepped params (in place into ``p`` when donated), in the order of torch's foreach step.
    """
    dtype = g[0].dtype
    # Bias corrections in double precision, as torch computes them, but on the device: no sync.
    t = count.to(torch.float64)
    step_size = -(lr / (1 - torch.pow(b1, t)))
    bc2_sqrt = torch.sqrt(1 - torch.pow(b2, t))
    if donate:
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_mul_(nu, b2)
    else:
        mu = list(torch._foreach_lerp(mu, g, 1 - b1))
        nu = list(torch._foreach_mul(nu, b2))
    torch._foreach_addcmul_(nu, g, g, 1 - b2)
    denom = list(torch._foreach_sqrt(nu))
    torch._foreach_div_(denom, bc2_sqrt.to(dtype))
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, step_size.to(dtype))  # denom / step: the update is mu / denom
    if decay:
        # round(p * (1 - lr * wd)) first, then the Adam step (then - p for an update): params +
        # update rounds as torch's ``p.mul_(1 - lr * wd)`` then step. A one-pass ``-lr * wd * p``
        # drifts from torch by rounding noise at the params' scale that reaches ~1e-6 in 50 steps.
        keep = 1 - lr * weight_decay
        keep = keep.to(dtype) if isinstance(keep, torch.Tensor) else keep
        if apply and donate:
            torch._foreach_mul_(p, keep)
            u = p
        else:
            u = list(torch._foreach_mul(p, keep))
        torch._foreach_addcdiv_(u, mu, denom)
        if not apply:
            torch._foreach_sub_(u, p)
    elif apply and donate:
        torch._foreach_addcdiv_(p, mu, denom)
        u = p
    elif apply:
        u = list(torch._foreach_addcdiv(p, mu, denom))
    else:
        u = list(torch._foreach_div(mu, denom))
    return u, mu, nu
