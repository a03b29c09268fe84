"""The parameter layout, declared once: every leaf's dotted path, shape and initialisation.

:func:`param_shapes`, :func:`init_params` and :func:`check_shapes` (so :func:`check_params`, and the
checks of params files and GPT-2 directories) are all read off :func:`param_layout`, so a leaf added
or reshaped here is added or reshaped everywhere. Linear weights are stored (out, in) as
``F.linear`` wants them; ``wte`` is the token embedding and, tied, the output head.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._tree import tree_flatten_with_paths, tree_from_paths
from .config import ModelConfig

__all__ = ["Leaf", "EMBEDDINGS", "param_layout", "param_shapes", "init_params", "check_shapes", "check_params"]

EMBEDDINGS = ("wte", "wpe")  # embedding tables (lookups, not matmuls): optimizers leave them undecayed


class Leaf(NamedTuple):
    """One parameter leaf of the layout."""

    shape: tuple[int, ...]
    init: str  # "normal" (N(0, init_std)), "residual" (N(0, init_std / sqrt(2 n_layer))), "zeros", "ones"


def param_layout(cfg: ModelConfig) -> dict[str, Leaf]:
    """``{dotted path: Leaf}`` for ``cfg``, in the order :func:`init_params` draws them.

    Example:
        >>> param_layout(ModelConfig(n_layer=1, n_embd=8, n_head=2, bias=False))["h.0.mlp.c_fc.weight"]
        Leaf(shape=(32, 8), init='normal')
    """
    C, V, H = cfg.n_embd, cfg.vocab_size, cfg.mlp_ratio * cfg.n_embd
    layout: dict[str, Leaf] = {"wte": Leaf((V, C), "normal"), "wpe": Leaf((cfg.block_size, C), "normal")}

    def linear(prefix: str, out_f: int, in_f: int, init: str = "normal") -> None:
        layout[prefix + ".weight"] = Leaf((out_f, in_f), init)
        if cfg.bias:
            layout[prefix + ".bias"] = Leaf((out_f,), "zeros")

    def norm(prefix: str) -> None:
        layout[prefix + ".weight"] = Leaf((C,), "ones")
        if cfg.bias:
            layout[prefix + ".bias"] = Leaf((C,), "zeros")

    for i in range(cfg.n_layer):
        p = f"h.{i}"
        norm(p + ".ln_1")
        linear(p + ".attn.c_attn", 3 * C, C)
        # GPT-2 paper, section 2.3: residual output projections scaled by 1 / sqrt(2 n_layer).
        linear(p + ".attn.c_proj", C, C, "residual")
        norm(p + ".ln_2")
        linear(p + ".mlp.c_fc", H, C)
        linear(p + ".mlp.c_proj", C, H, "residual")
    norm("ln_f")
    return layout


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The ``{dotted path: shape}`` every params tree for ``cfg`` must have."""
    return {path: leaf.shape for path, leaf in param_layout(cfg).items()}


def init_params(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict:
    """Fresh parameters with GPT-2's initialisation.

    Weights ~ N(0, init_std), residual output projections ~ N(0, init_std / sqrt(2 n_layer)),
    biases zero, layer-norm gains one. The draws are made on the CPU from ``seed``, leaf by leaf in
    the layout's order, so the same seed gives the same model on every device.

    Args:
        cfg: model shape.
        seed: random seed.
        dtype: floating dtype of every leaf.
        device: where the leaves live.

    Returns:
        A nested dict: wte (V, C), wpe (block_size, C), h [list of blocks], ln_f.

    Example:
        >>> params = init_params(ModelConfig(n_layer=1, n_embd=32, n_head=2), seed=0)
        >>> params["wte"].shape
        torch.Size([256, 32])
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"init_params: cfg must be a ModelConfig, got {type(cfg).__name__}; "
                        "build one with ModelConfig(...) or get_config('tiny').")
    gen = torch.Generator().manual_seed(seed)
    std = {"normal": cfg.init_std, "residual": cfg.init_std / math.sqrt(2 * cfg.n_layer)}
    flat = {}
    for path, leaf in param_layout(cfg).items():
        if leaf.init in std:
            value = (torch.randn(leaf.shape, generator=gen) * std[leaf.init]).to(device=device, dtype=dtype)
        else:
            value = (torch.zeros if leaf.init == "zeros" else torch.ones)(leaf.shape, device=device, dtype=dtype)
        flat[path] = value
    return tree_from_paths(flat)


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, *, caller: str, source: str) -> None:
    """Raise ValueError listing the missing, unexpected and mis-shaped keys of ``shapes`` against ``cfg``."""
    want = param_shapes(cfg)
    missing = [k for k in want if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in want)
    wrong = [f"{k}: expected {want[k]}, got {tuple(shapes[k])}" for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {unexpected}"] * bool(unexpected)
        parts += ["wrong shapes [" + "; ".join(wrong) + "]"] * bool(wrong)
        raise ValueError(
            f"{caller}: {source} does not match the config (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, "
            f"vocab_size={cfg.vocab_size}, block_size={cfg.block_size}, bias={cfg.bias}): " + "; ".join(parts) + "."
        )


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Raise ValueError listing every missing, unexpected or mis-shaped leaf of ``params``."""
    try:
        flat = tree_flatten_with_paths(params)
    except Exception as err:  # not a tree at all
        raise ValueError(f"check_params: params is not a pytree of tensors ({err}).") from None
    check_shapes({k: tuple(getattr(v, "shape", ())) for k, v in flat.items()}, cfg, caller="check_params",
                 source="params")
