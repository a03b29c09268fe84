"""The training text: the built-in corpus (Python's reference documentation) or the user's files.

``pydoc_data.topics`` ships with every CPython, so the default run needs no download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .tokens import encode

__all__ = ["load_corpus", "train_val_split"]


def _builtin_corpus() -> bytes:
    from pydoc_data import topics  # ships with CPython

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def load_corpus(path: str | os.PathLike | None = None) -> torch.Tensor:
    """The training text as byte ids.

    Args:
        path: None for the built-in corpus (Python's reference docs, ~465 kB); a text file; or a
            folder, whose regular files are read recursively in sorted order and joined by a newline.

    Returns:
        (N,) int64 byte ids.

    Raises:
        ValueError: the path does not exist, or holds no text.
    """
    if path is None:
        return encode(_builtin_corpus())
    p = Path(path)
    if not p.exists():
        raise ValueError(f"load_corpus: corpus path {str(p)!r} does not exist; give a text file or a folder of them.")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        data = b"\n".join(f.read_bytes() for f in files)
    else:
        data = p.read_bytes()
    if len(data.strip()) == 0:
        raise ValueError(f"load_corpus: corpus {str(p)!r} is empty; it needs some text to train on.")
    return encode(data)


def train_val_split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: the first ``1 - val_fraction`` of the ids train, the rest validate."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in (0, 1), got {val_fraction}.")
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val], data[-n_val:]
