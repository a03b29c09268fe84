"""Bytes as tokens, the built-in corpus, and batches with masks.

The byte tokenizer has 256 ids and is lossless for any UTF-8 text. The built-in corpus is the text
of Python's reference documentation (``pydoc_data.topics``), which ships with every CPython, so the
main job needs no download. Batches are a function of (seed, index), so a resumed run sees exactly
the batches an unbroken one would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from ._model import IGNORE_INDEX

__all__ = [
    "Batch",
    "encode",
    "decode",
    "load_corpus",
    "train_val_split",
    "sample_batch",
    "split_microbatches",
    "pad_sequences",
    "pack_documents",
]


class Batch(NamedTuple):
    """One batch of next-token prediction; every field is (B, T) or None."""

    tokens: torch.Tensor  # (B, T) int64 input ids
    targets: torch.Tensor  # (B, T) int64 next ids, IGNORE_INDEX where not counted
    mask: torch.Tensor | None = None  # (B, T) float32 loss weight, 1 = counted
    attention_mask: torch.Tensor | None = None  # (B, T) bool, False = padding key
    segment_ids: torch.Tensor | None = None  # (B, T) int64 document ids for packed rows

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return int(self.tokens.shape[0])


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


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, *, seed: int, index: int, device=None
) -> Batch:
    """Batch number ``index`` of random windows from ``data``, a pure function of (seed, index).

    Args:
        data: (N,) int64 ids; N must exceed ``seq_len``.
        batch_size: rows B.
        seq_len: T.
        seed, index: the batch is the same for the same pair, in any process.

    Returns:
        A full Batch (mask all ones, no padding).
    """
    if len(data) <= seq_len:
        raise ValueError(
            f"sample_batch: the data has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a longer corpus or a shorter sequence."
        )
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
    offsets = torch.arange(seq_len + 1)
    windows = data[starts[:, None] + offsets[None, :]]  # (B, T + 1)
    tokens, targets = windows[:, :-1], windows[:, 1:]
    mask = torch.ones(tokens.shape, dtype=torch.float32)
    batch = Batch(tokens.contiguous(), targets.contiguous(), mask)
    return batch if device is None else Batch(*(x.to(device) if x is not None else None for x in batch))


def split_microbatches(batch: Batch, k: int) -> list[Batch]:
    """Split a batch along rows into ``k`` micro-batches (sizes differ by at most one).

    Raises:
        ValueError: k < 1 or k > batch size.
    """
    B = batch.size
    if not isinstance(k, int) or k < 1 or k > B:
        raise ValueError(
            f"split_microbatches: accumulation steps must be between 1 and the batch size {B}, got {k}; "
            "lower the accumulation steps or raise the batch size."
        )
    parts = [torch.tensor_split(x, k, dim=0) if x is not None else [None] * k for x in batch]
    return [Batch(*fields) for fields in zip(*parts)]


def pad_sequences(sequences: Sequence[Sequence[int]], seq_len: int | None = None, *, pad_id: int = 0) -> Batch:
    """A right-padded batch from token sequences of different lengths.

    Each sequence of length n gives n - 1 counted next-token targets; padding is masked out of
    attention (as keys) and of the loss.

    Example:
        >>> b = pad_sequences([[1, 2, 3], [4, 5]])
        >>> b.mask.tolist()
        [[1.0, 1.0], [1.0, 0.0]]
    """
    lengths = [len(s) for s in sequences]
    if not sequences or min(lengths) < 2:
        raise ValueError("pad_sequences: every sequence needs at least 2 tokens (an input and a target).")
    T = seq_len if seq_len is not None else max(lengths) - 1
    B = len(sequences)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.bool)
    for i, s in enumerate(sequences):
        s = torch.as_tensor(list(s), dtype=torch.long)[: T + 1]
        n = len(s) - 1
        tokens[i, :n] = s[:-1]
        targets[i, :n] = s[1:]
        attn[i, :n] = True
    return Batch(tokens, targets, attn.to(torch.float32), attn)


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, *, pad_id: int = 0) -> Batch:
    """Pack whole documents into rows of ``seq_len`` with segment ids (greedy, in order).

    Each document of length n contributes n - 1 targets; a target never crosses a document edge.
    Rows are padded at the end with segment id -1, which is masked from the loss and attention.
    """
    rows: list[list[tuple[int, list[int]]]] = [[]]
    used = 0
    for doc_id, doc in enumerate(documents):
        doc = list(doc)
        if len(doc) < 2:
            raise ValueError(f"pack_documents: document {doc_id} has fewer than 2 tokens.")
        n = len(doc) - 1
        if n > seq_len:
            raise ValueError(f"pack_documents: document {doc_id} needs {n} positions, more than seq_len {seq_len}.")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((doc_id, doc))
        used += n
    B = len(rows)
    tokens = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for doc_id, doc in row:
            n = len(doc) - 1
            tokens[r, at : at + n] = torch.tensor(doc[:-1])
            targets[r, at : at + n] = torch.tensor(doc[1:])
            seg[r, at : at + n] = doc_id
            at += n
    real = seg >= 0
    return Batch(tokens, targets, real.to(torch.float32), real, seg)
