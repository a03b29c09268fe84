"""Params files: one safetensors file per params tree, written atomically, read memory-mapped.

Keys are the tree's dotted paths ("h.0.attn.c_attn.weight"); the tied leaf ``wte`` is one key,
serving as embedding and output head. The metadata holds the config as JSON, the stored dtype and
the format's name and version, so a file alone rebuilds the model, and optionally the training
step the params come from (a run directory's ``params.safetensors`` is compared with its newest
checkpoint by it). Half precision (fp16 by default) halves the file; loading returns fp32 masters
unless asked otherwise. Files are sealed with their sha256 and verified on load (``tensor_files``).
"""

from __future__ import annotations

import json
import os

import torch

from .._dtypes import dtype_name, parse_dtype
from .._tree import tree_flatten_with_paths, tree_from_paths
from .._version import __version__
from ..model.config import ModelConfig
from ..model.layout import check_params, check_shapes, param_shapes
from .files import check_finite, check_folder, magnitudes
from .tensor_files import atomic_save_safetensors, open_safetensors, read_header

__all__ = ["save_params", "load_params", "params_file_info", "prepare_tensors", "FORMAT_NAME", "FORMAT_VERSION",
           "STORED_DTYPES"]

FORMAT_NAME = "functional_memopt.params"  # metadata "functional_memopt.format"
FORMAT_VERSION = 1  # bump when the layout changes; readers refuse newer versions
STORED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what a params file may hold


def prepare_tensors(flat: dict[str, torch.Tensor], dtype: torch.dtype, *, caller: str) -> dict[str, torch.Tensor]:
    """Leaves cast once to ``dtype``, contiguous and not sharing memory, ready for safetensors.

    Raises ValueError naming the leaves that are non-finite or beyond ``dtype``'s range (casting
    would turn them into inf), before anything is written.
    """
    peaks = magnitudes(flat)
    bad = [k for k, m in peaks.items() if not (m < float("inf"))]
    if bad:
        raise ValueError(
            f"{caller}: leaves {bad} hold inf or nan values; nothing was written. Find the step that "
            "produced them (e.g. skip non-finite updates) and save finite params."
        )
    limit = torch.finfo(dtype).max
    over = [(k, m) for k, m in peaks.items() if m > limit]
    if over:
        k, m = over[0]
        hint = "dtype=torch.bfloat16 (float32's range) or torch.float32" if dtype == torch.float16 else "dtype=torch.float32"
        raise ValueError(
            f"{caller}: leaf {k!r} has values up to {m:.4g} in magnitude, beyond {dtype}'s largest "
            f"value {limit:.6g}, so they would become inf (leaves out of range: {[o[0] for o in over]}). "
            f"Save with {hint}; nothing was written."
        )
    out, seen = {}, set()
    for k, v in flat.items():
        v = v.detach()
        want = dtype if v.is_floating_point() else v.dtype
        if v.is_contiguous():
            t = v.to(want)  # no copy when already of the stored dtype
        else:  # e.g. a transposed view: cast and lay out in one copy, not two
            t = torch.empty_like(v, dtype=want, memory_format=torch.contiguous_format).copy_(v)
        # safetensors refuses tensors sharing memory (e.g. views into one flat buffer); copy them.
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[k] = t
    return out


def save_params(path: str | os.PathLike, params: dict, cfg: ModelConfig, *, dtype: torch.dtype | str = torch.float16,
                step: int | None = None) -> None:
    """Write ``params`` and ``cfg`` to one safetensors file, atomically.

    Args:
        path: the file to write (its folder must exist); an existing file is replaced only once
            the new one is complete.
        params: tree from :func:`init_params` matching ``cfg``, all values finite.
        cfg: the model config, stored as JSON in the metadata.
        dtype: stored dtype, torch.float16 (default), torch.bfloat16 or torch.float32 (or "fp16",
            "bf16", "fp32"). Values beyond fp16's range (|x| > 65504) need bf16 or fp32.
        step: the training step these params come from, stored in the metadata (None: not recorded).

    Example:
        >>> cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32)
        >>> save_params("model.safetensors", init_params(cfg), cfg)  # doctest: +SKIP
        >>> params, cfg = load_params("model.safetensors")  # doctest: +SKIP
    """
    dtype = parse_dtype(dtype, caller="save_params", allowed=STORED_DTYPES)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"save_params: step must be None or an int >= 0, got {step!r}.")
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"save_params: cfg must be a ModelConfig, got {type(cfg).__name__}.")
    path = os.fspath(path)
    check_folder(path, "save_params")  # fail before the (possibly long) cast
    try:
        check_params(params, cfg)
    except ValueError as err:
        raise ValueError(f"save_params: {err}") from None
    tensors = prepare_tensors(tree_flatten_with_paths(params), dtype, caller="save_params")
    metadata = {
        "format": "pt",  # the safetensors convention other readers look for
        "functional_memopt.format": FORMAT_NAME,
        "functional_memopt.format_version": str(FORMAT_VERSION),
        "functional_memopt.version": __version__,
        "functional_memopt.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "functional_memopt.dtype": dtype_name(dtype),
    }
    if step is not None:
        metadata["functional_memopt.step"] = str(step)
    atomic_save_safetensors(path, tensors, metadata, caller="save_params")


def _config_from_metadata(meta: dict, path: str) -> ModelConfig:
    if meta.get("functional_memopt.format") != FORMAT_NAME:
        raise ValueError(
            f"load_params: {path!r} is a safetensors file but not a params file written by save_params "
            f"(metadata format {meta.get('functional_memopt.format')!r}); for a Hugging Face GPT-2 "
            "checkpoint use load_gpt2(directory)."
        )
    version = meta.get("functional_memopt.format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(
            f"load_params: {path!r} has format version {version!r}; this functional_memopt "
            f"({__version__}) reads versions up to {FORMAT_VERSION}. Upgrade functional_memopt."
        )
    try:
        return ModelConfig.from_dict(json.loads(meta["functional_memopt.config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"load_params: {path!r} holds no usable config in its metadata ({err}).") from None


def load_params(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> tuple[dict, ModelConfig]:
    """Read a file written by :func:`save_params`: the params tree and its config.

    Tensors are read from a memory map one at a time, checked against the stored config (every
    key and shape) and for non-finite values.

    Args:
        path: the file.
        dtype: dtype of the returned leaves; None gives float32 masters whatever was stored.
        device: where the leaves go (default CPU).

    Returns:
        (params, cfg).

    Example:
        >>> params, cfg = load_params("model.safetensors", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    dtype = torch.float32 if dtype is None else parse_dtype(dtype, caller="load_params", allowed=STORED_DTYPES)
    path = os.fspath(path)
    with open_safetensors(path, caller="load_params", itemsize=dtype.itemsize) as f:
        cfg = _config_from_metadata(f.metadata() or {}, path)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_shapes(shapes, cfg, caller="load_params", source=repr(path))
        flat = {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in param_shapes(cfg)}
    check_finite(flat, caller="load_params", source=repr(path))
    params = tree_from_paths(flat)
    check_params(params, cfg)
    return params, cfg


def params_file_info(path: str | os.PathLike) -> dict:
    """What a params file's header says, without reading (or verifying) a tensor.

    Returns:
        ``{"step": int or None, "dtype": str or None, "config": dict or None}``; ValueError when the
        file is not a readable safetensors file.

    Example:
        >>> params_file_info("runs/demo/params.safetensors")["step"]  # doctest: +SKIP
        420
    """
    path = os.fspath(path)
    try:
        _, header = read_header(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"params_file_info: {path!r} is not a readable safetensors file ({err}).") from None
    meta = header.get("__metadata__") or {}
    step = meta.get("functional_memopt.step")
    try:
        config = json.loads(meta["functional_memopt.config"])
    except (KeyError, TypeError, ValueError):
        config = None
    return {"step": int(step) if isinstance(step, str) and step.isdigit() else None,
            "dtype": meta.get("functional_memopt.dtype"), "config": config}
