"""Floating dtypes by name: the one table that policies, params files and checkpoints read.

Example:
    >>> parse_dtype("bf16", caller="example")
    torch.bfloat16
    >>> dtype_name(torch.float16)
    'float16'
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_name", "parse_dtype"]

_F64, _F32, _F16, _BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# Every name a user may write for a floating dtype, lower case.
DTYPES: dict[str, torch.dtype] = {
    "float32": _F32, "fp32": _F32, "f32": _F32, "float": _F32,
    "float16": _F16, "fp16": _F16, "f16": _F16, "half": _F16,
    "bfloat16": _BF16, "bf16": _BF16,
    "float64": _F64, "fp64": _F64, "f64": _F64, "double": _F64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of ``dtype`` ("float32", "bfloat16", "int64", ...), as torch prints it."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(spec: torch.dtype | str, *, caller: str, allowed: tuple = (_F32, _F16, _BF16, _F64)) -> torch.dtype:
    """``spec`` (a torch dtype or a name from :data:`DTYPES`, any case) as a torch dtype in ``allowed``.

    Raises:
        ValueError: naming ``caller``, what came and the accepted names.
    """
    dtype = DTYPES.get(spec.lower()) if isinstance(spec, str) else spec
    if dtype in allowed:
        return dtype
    names = ", ".join(f"torch.{dtype_name(d)}" for d in allowed)
    short = ", ".join(repr(n) for n, d in DTYPES.items() if d in allowed and len(n) <= 4)
    raise ValueError(f"{caller}: dtype must be one of {names} (or a name such as {short}), got {spec!r}.")
