"""The byte tokenizer: 256 ids, lossless for any UTF-8 text."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["encode", "decode", "BYTE_VOCAB"]

BYTE_VOCAB = 256  # ids of the byte tokenizer


def encode(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor of ids in [0, 256).

    Example:
        >>> encode("hé").tolist()
        [104, 195, 169]
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Text for byte ids; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD.

    Example:
        >>> decode(encode("naïve"))
        'naïve'
    """
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(int(v) & 0xFF for v in values).decode("utf-8", errors="replace")
