"""Rematerialisation (activation checkpointing) that works under ``torch.func.grad``.

``torch.utils.checkpoint`` relies on saved-tensor hooks, which ``torch.func.grad`` and ``vjp`` do
not support (pytorch issue 122729). Instead a custom ``torch.autograd.Function`` with a separate
``setup_context`` (the form function transforms accept) saves only the block's inputs, and its
backward recomputes the block with ``torch.func.vjp``. Memory falls from every activation inside
the block to its input alone, at the cost of one more forward per block.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

__all__ = ["remat", "remat_layers", "RematSpec"]

RematSpec = Any  # None | "none" | "all" | int n or "n" (every n-th block) | indices, or "i,j,k"


class _Remat(torch.autograd.Function):
    @staticmethod
    def forward(fn, treespec, x, *leaves):
        return fn(optree.tree_unflatten(treespec, list(leaves)), x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, treespec, x, *leaves = inputs
        ctx.fn = fn
        ctx.treespec = treespec
        ctx.save_for_backward(x, *leaves)

    @staticmethod
    def backward(ctx, grad_out):
        x, *leaves = ctx.saved_tensors
        fn, treespec = ctx.fn, ctx.treespec

        def recompute(x_, *leaves_):
            return fn(optree.tree_unflatten(treespec, list(leaves_)), x_)

        # No enable_grad here: torch.func.vjp is a function transform and differentiates whatever
        # the grad mode, while under the outer backward's no-grad mode the recomputed
        # activations stay out of the outer autograd graph and are freed when this returns.
        _, vjp_fn = torch.func.vjp(recompute, x, *leaves)
        return (None, None, *vjp_fn(grad_out))


def remat(fn: Callable, params: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn(params, x)``, keeping only ``params`` and ``x`` for the backward pass.

    Args:
        fn: a pure function of (params pytree, x); constants it needs (masks) are closed over and
            receive no gradient.
        params: the pytree of tensors ``fn`` differentiates with respect to.
        x: the activation input, e.g. (B, T, C).

    Returns:
        ``fn(params, x)``; gradients equal those of the plain call.

    Example:
        >>> w = torch.randn(4, 4)
        >>> y = remat(lambda p, x: torch.tanh(x @ p["w"]), {"w": w}, torch.randn(2, 4))
    """
    leaves, treespec = optree.tree_flatten(params)
    return _Remat.apply(fn, treespec, x, *leaves)


def remat_layers(spec: RematSpec, n_layer: int) -> frozenset[int]:
    """The block indices to rematerialise for ``spec``: the one parser of remat specs.

    Args:
        spec: None, False or "none" (no block); True or "all" (every block); an int n or its text
            "n" (every n-th block, starting at block 0: 0, n, 2n, ...); indices as an iterable or
            as text "i,j,k".
        n_layer: number of blocks.

    Raises:
        ValueError: an unknown spec, n < 1, or an index outside [0, n_layer).

    Example:
        >>> sorted(remat_layers(2, 5)), sorted(remat_layers("1,3", 5))
        ([0, 2, 4], [1, 3])
    """
    if spec is None or spec is False or (isinstance(spec, str) and spec.strip().lower() == "none"):
        return frozenset()
    if spec is True or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return frozenset(range(n_layer))
    if isinstance(spec, str):
        text = spec.replace(" ", "")
        try:
            spec = int(text) if "," not in text else [int(p) for p in text.split(",") if p]
        except ValueError:
            raise ValueError(
                f"remat_layers: unknown spec {spec!r}; use none, all, an integer n (every n-th block) or "
                "block indices such as 0,2,3."
            ) from None
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"remat_layers: every-n-th spec must be >= 1, got {spec}; pass e.g. 2 for blocks 0, 2, 4, ...")
        return frozenset(range(0, n_layer, spec))
    try:
        chosen = frozenset(int(i) for i in spec)
    except (TypeError, ValueError):
        raise ValueError(f"remat_layers: unknown spec {spec!r}; use none, all, an integer n or block indices.") from None
    bad = sorted(i for i in chosen if not 0 <= i < n_layer)
    if bad:
        raise ValueError(f"remat_layers: block indices {bad} out of range for {n_layer} blocks.")
    return chosen
