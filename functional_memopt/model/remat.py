"""Rematerialisation (activation checkpointing) that works under ``torch.func.grad``.

``torch.utils.checkpoint`` relies on saved-tensor hooks, which ``torch.func.grad`` and ``vjp`` do
not support (pytorch issue 122729). Instead a custom ``torch.autograd.Function`` with a separate
``setup_context`` (the form function transforms accept) saves only the block's inputs, and its
backward recomputes the block with ``torch.func.vjp``. Memory falls from every activation inside
the block to its input alone, at the cost of one more forward per block.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import optree
import torch

__all__ = ["remat", "remat_layers", "RematSpec", "torch_checkpoint_when_traced"]

RematSpec = Any  # None | "none" | "all" | int n or "n" (every n-th block) | indices, or "i,j,k"


# Set (by make_train_step's compiled loss, through torch_checkpoint_when_traced) only around a
# torch.compile'd function that torch.autograd differentiates from outside: there the block is
# traced as torch.utils.checkpoint. Anywhere else (eager, or a compiled region under
# torch.func.grad, which rejects the saved-tensor hooks torch.utils.checkpoint uses) the _Remat
# function below runs. Dynamo guards on this global, so flipping it recompiles.
_TORCH_CHECKPOINT_WHEN_TRACED = False


@contextlib.contextmanager
def torch_checkpoint_when_traced():
    """Within this block, :func:`remat` traced by dynamo becomes ``torch.utils.checkpoint``."""
    global _TORCH_CHECKPOINT_WHEN_TRACED
    before = _TORCH_CHECKPOINT_WHEN_TRACED
    _TORCH_CHECKPOINT_WHEN_TRACED = True
    try:
        yield
    finally:
        _TORCH_CHECKPOINT_WHEN_TRACED = before


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
    if _TORCH_CHECKPOINT_WHEN_TRACED and torch.compiler.is_compiling():
        # Traced, _Remat's recompute would be merged back into the forward by AOTAutograd (CSE
        # and the partitioner keep every activation: measured 19.8 MiB saved vs 4.2 MiB on tiny
        # with 2 blocks). torch.utils.checkpoint is what dynamo turns into a region the
        # partitioner must recompute, so the compiled graph saves only the block inputs.
        return torch.utils.checkpoint.checkpoint(fn, params, x, use_reentrant=False)
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
