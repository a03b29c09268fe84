"""Pytree helpers on optree: the only place the library walks a tree of tensors.

Every function is pure: it returns new tensors and never writes into its inputs.
``None`` is an empty subtree (optree's default), so optional fields of NamedTuples are skipped.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

__all__ = [
    "tree_map",
    "tree_leaves",
    "tree_structure",
    "tree_cast",
    "tree_global_norm",
    "tree_all_finite",
    "tree_bytes",
    "tree_paths",
    "tree_flatten_with_paths",
    "tree_unflatten_from_paths",
    "tree_from_paths",
]

PyTree = Any


def tree_map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` applied leaf by leaf over ``tree`` and trees of the same structure."""
    return optree.tree_map(fn, tree, *rest)


def tree_leaves(tree: PyTree) -> list:
    """The leaves of ``tree`` in optree's canonical order (dict keys sorted)."""
    return optree.tree_leaves(tree)


def tree_structure(tree: PyTree):
    """The treespec of ``tree``."""
    return optree.tree_structure(tree)


def _is_float(x: torch.Tensor) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()





def floats_already(tree: PyTree, ok: Callable[[torch.Tensor], bool]) -> bool:
    """Whether every floating leaf satisfies ``ok``, so that a cast of the tree would change nothing.

    False while dynamo traces (it cannot trace ``optree.tree_leaves`` of the policy's
    ``(args, kwargs)``): there the cast runs, and casts nothing.
    """
    return not torch.compiler.is_compiling() and all(ok(x) for x in optree.tree_leaves(tree) if _is_float(x))


def tree_cast(tree: PyTree, dtype: torch.dtype | None) -> PyTree:
    """Floating-point leaves cast to ``dtype``; integer and bool leaves untouched.

    A leaf already of ``dtype`` is returned as is (no copy), as ``Tensor.to`` does, and a tree
    with nothing to cast is returned itself (no new containers: the step casts every step).
    """
    if dtype is None or floats_already(tree, lambda x: x.dtype == dtype):
        return tree
    return optree.tree_map(lambda x: x.to(dtype) if _is_float(x) else x, tree)



def tree_global_norm(tree: PyTree) -> torch.Tensor:
    """The L2 norm of all leaves together, as a 0-d float32 tensor.

    Each leaf's norm is taken in float32 (half-precision squares overflow at 256).
    """
    leaves = [x for x in optree.tree_leaves(tree) if _is_float(x)]
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([x.float() if x.dtype != torch.float64 else x for x in leaves])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def tree_all_finite(tree: PyTree) -> torch.Tensor:
    """A 0-d bool tensor: True when no floating leaf holds an inf or nan.

    One fused reduction per leaf and no host sync, so it can sit inside a compiled step.
    """
    leaves = [x for x in optree.tree_leaves(tree) if _is_float(x)]
    if not leaves:
        return torch.ones((), dtype=torch.bool)
    flags = torch.stack([torch.isfinite(x).all() for x in leaves])
    return flags.all()



def tree_bytes(tree: PyTree) -> int:
    """Total bytes held by the tensor leaves of ``tree`` (shared storage counted once)."""
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


def _accessor_to_str(accessor) -> str:
    # NamedTuple fields by name ("opt_state.mu.wte"), dict keys and list indices as they are.
    return ".".join(str(getattr(e, "field", None) or e.entry) for e in accessor)


def tree_paths(tree: PyTree) -> list[str]:
    """Dotted key paths of the leaves, e.g. ``"h.0.attn.c_attn.weight"`` or ``"loss_scale.counter"``."""
    return [_accessor_to_str(a) for a in optree.tree_accessors(tree)]


def tree_flatten_with_paths(tree: PyTree) -> dict[str, Any]:
    """A flat ``{dotted path: leaf}`` dict, in canonical leaf order (NamedTuple fields by name)."""
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree)
    return {_accessor_to_str(a): leaf for a, leaf in zip(accessors, leaves)}


def tree_unflatten_from_paths(flat: dict[str, Any], like: PyTree) -> PyTree:
    """Rebuild a tree shaped like ``like`` from a ``{dotted path: leaf}`` dict.

    Raises ValueError listing missing and unexpected keys.
    """
    paths = tree_paths(like)
    missing = [p for p in paths if p not in flat]
    unexpected = sorted(set(flat) - set(paths))
    if missing or unexpected:
        raise ValueError(
            "tree_unflatten_from_paths: keys do not match the expected tree; "
            f"missing {missing}, unexpected {unexpected}."
        )
    spec = optree.tree_structure(like)
    return optree.tree_unflatten(spec, [flat[p] for p in paths])


def tree_from_paths(flat: dict[str, Any]) -> dict:
    """The nested dict whose dotted paths are the keys of ``flat``; folders keyed 0..n-1 become lists.

    The inverse of :func:`tree_flatten_with_paths` for trees of dicts and lists (params trees).

    Example:
        >>> tree_from_paths({"h.0.w": 1, "h.1.w": 2, "wte": 3})
        {'h': [{'w': 1}, {'w': 2}], 'wte': 3}
    """
    root: dict = {}
    for path, leaf in flat.items():
        node = root
        *heads, last = path.split(".")
        for part in heads:
            node = node.setdefault(part, {})
        node[last] = leaf

    def listify(node):
        if not isinstance(node, dict):
            return node
        out = {k: listify(v) for k, v in node.items()}
        if out and all(k.isdigit() for k in out) and sorted(map(int, out)) == list(range(len(out))):
            return [out[str(i)] for i in range(len(out))]
        return out

    return listify(root)
