"""Small pytree helpers of the benchmarks (the library's own tree helpers are internal).

Each mirrors what the step does to a tree, on optree and torch only, so the benchmarks import
nothing but the public ``functional_memopt`` names.
"""

from __future__ import annotations

from typing import Any

import optree
import torch


def _floats(tree: Any) -> list[torch.Tensor]:
    return [x for x in optree.tree_leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def tree_bytes(tree: Any) -> int:
    """Bytes held by the tensor leaves of ``tree``; a view met twice (same storage, offset,
    shape and dtype) is counted once."""
    seen: set = set()
    total = 0
    for x in optree.tree_leaves(tree):
        if not isinstance(x, torch.Tensor):
            continue
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.dtype)
        if key in seen and x.numel() > 0:
            continue
        seen.add(key)
        total += x.numel() * x.element_size()
    return total


def tree_cast(tree: Any, dtype: torch.dtype) -> Any:
    """Floating-point leaves cast to ``dtype`` (no copy where already of it); others untouched."""
    return optree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                           tree)


def tree_numel(tree: Any) -> int:
    """Elements of the tensor leaves of ``tree``."""
    return sum(x.numel() for x in optree.tree_leaves(tree) if isinstance(x, torch.Tensor))


def tree_all_finite(tree: Any) -> torch.Tensor:
    """A 0-d bool tensor, no host sync: no floating leaf holds an inf or nan (one reduction per leaf)."""
    leaves = _floats(tree)
    if not leaves:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(x).all() for x in leaves]).all()


def tree_global_norm(tree: Any) -> torch.Tensor:
    """The L2 norm of all floating leaves together, each leaf's norm in float32 (``_foreach_norm``)."""
    leaves = _floats(tree)
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([x.float() if x.dtype != torch.float64 else x for x in leaves])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def tree_select(pred: torch.Tensor | bool, on_true: Any, on_false: Any) -> Any:
    """``on_true`` where ``pred`` holds, else ``on_false``, leaf by leaf; a tensor ``pred`` goes
    through ``torch.where`` (no host sync), a bool picks a tree as it is."""
    if isinstance(pred, bool):
        return on_true if pred else on_false
    return optree.tree_map(lambda a, b: torch.where(pred, a, b), on_true, on_false)


def tree_flatten_with_paths(tree: Any) -> dict[str, Any]:
    """A flat ``{dotted path: leaf}`` dict, e.g. ``"h.0.attn.c_attn.weight"``."""
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree)
    return {".".join(str(getattr(e, "field", None) or e.entry) for e in a): leaf for a, leaf in zip(accessors, leaves)}
