"""Batches of next-token prediction: the Batch type, sampling, micro-batches, padding, packing.

Batches are a function of (seed, index), so a resumed run sees exactly the batches an unbroken
one would. Which targets count is decided here once: :func:`token_weights` is the per-token weight
the model's loss multiplies by and the step's token count sums.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "check_batch",
    "token_weights",
    "token_count",
    "rows_per_microbatch",
    "sample_batch",
    "split_microbatches",
    "pad_sequences",
    "pack_documents",
]

IGNORE_INDEX = -100  # targets equal to this are not counted (torch's cross_entropy default)


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


def check_batch(batch, *, vocab_size: int | None = None, block_size: int | None = None,
                caller: str = "check_batch") -> None:
    """Raise TypeError / ValueError, naming the field and the fix, for a batch the model's loss cannot take.

    Checks every field's type, dtype and (B, T) shape, T against ``block_size`` and the ids against
    ``vocab_size`` (targets may also be IGNORE_INDEX). The id range costs one host sync; the rest
    reads only shapes and dtypes.

    Args:
        batch: a :class:`Batch` (or any object with its fields).
        vocab_size, block_size: the model's (None: not checked).
        caller: the name at the start of error messages.

    Example:
        >>> check_batch(Batch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), vocab_size=8)
    """
    tokens, targets = getattr(batch, "tokens", None), getattr(batch, "targets", None)
    for name, x in (("tokens", tokens), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{caller}: batch.{name} must be a (B, T) int64 tensor of token ids, got "
                            f"{type(x).__name__}; build batches with Batch(tokens, targets, ...).")
        if x.dtype != torch.long:
            raise TypeError(f"{caller}: batch.{name} must hold int64 token ids, got dtype {x.dtype}; convert with "
                            f"{name}.long() (ids are whole numbers in [0, vocab_size)).")
    if tokens.dim() != 2:
        raise ValueError(f"{caller}: batch.tokens must have shape (B, T), got {tuple(tokens.shape)}; add a batch "
                         "dimension with tokens[None] for a single sequence.")
    B, T = tokens.shape
    if block_size is not None and T > block_size:
        raise ValueError(f"{caller}: batch.tokens has {T} positions, more than the model's block_size {block_size}; "
                         f"cut the sequences to at most {block_size} tokens or use a model with a larger block_size.")
    for name in ("targets", "mask", "attention_mask", "segment_ids"):
        x = getattr(batch, name, None)
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{caller}: batch.{name} must be None or a ({B}, {T}) tensor, got {type(x).__name__}.")
        if tuple(x.shape) != (B, T):
            raise ValueError(f"{caller}: batch.{name} has shape {tuple(x.shape)}, but batch.tokens has ({B}, {T}); "
                             f"give every field of the batch the tokens' shape (B, T).")
        if x.device != tokens.device:
            raise ValueError(f"{caller}: batch.{name} is on {x.device} but batch.tokens on {tokens.device}; move the "
                             "whole batch to one device.")
        if name == "segment_ids" and (x.is_floating_point() or x.dtype == torch.bool):
            raise TypeError(f"{caller}: batch.segment_ids must hold integer document ids, got dtype {x.dtype}.")
        if x.is_complex():
            raise TypeError(f"{caller}: batch.{name} must be real, got dtype {x.dtype}.")
    if vocab_size is None or not tokens.numel():
        return
    counted = torch.where(targets == IGNORE_INDEX, 0, targets)
    lo, hi, tlo, thi = torch.stack([*torch.aminmax(tokens), *torch.aminmax(counted)]).tolist()  # one host sync
    for name, low, high in (("tokens", lo, hi), ("targets", tlo, thi)):
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            extra = f" or IGNORE_INDEX ({IGNORE_INDEX})" if name == "targets" else ""
            raise ValueError(f"{caller}: batch.{name} holds the id {bad}, outside [0, vocab_size={vocab_size}){extra}; "
                             "check that the tokenizer matches the model's vocabulary.")


def token_weights(targets: torch.Tensor, mask: torch.Tensor | None = None, *,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each target's weight in the loss: 0 where it is IGNORE_INDEX, else the loss mask (1 without one).

    Args:
        targets: (B, T) int64 next-token ids.
        mask: optional (B, T) loss mask, nonzero where the token counts.
        dtype: dtype of the weights (float32, or float64 for float64 losses).

    Returns:
        (B * T,) weights, flattened as the loss flattens its tokens.

    Example:
        >>> token_weights(torch.tensor([[1, IGNORE_INDEX]]), torch.tensor([[0.5, 1.0]])).tolist()
        [0.5, 0.0]
    """
    weight = (targets.flatten() != IGNORE_INDEX).to(dtype)
    if mask is not None:
        weight = weight * mask.flatten().to(dtype)
    return weight


def token_count(batch) -> torch.Tensor:
    """Tokens the model's loss counts in ``batch``: the sum of its :func:`token_weights`, float64.

    Works for any object with ``targets`` and an optional ``mask`` field (e.g. :class:`Batch`).
    """
    targets = getattr(batch, "targets", None)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(
            "token_count: the batch has no `targets` tensor; pass count_fn= to make_train_step "
            f"for a batch of type {type(batch).__name__}."
        )
    return token_weights(targets, getattr(batch, "mask", None), dtype=torch.float64).sum()


def rows_per_microbatch(batch_size: int, accum_steps: int, world_size: int = 1, *, caller: str,
                        names: tuple[str, str] = ("batch size", "accumulation steps")) -> int:
    """Rows of each micro-batch when ``batch_size`` rows are split over ranks, then micro-batches.

    The one check of batch, accumulation and world-size divisibility, for every caller that needs
    equal micro-batches (the training command, the memory ledger).

    Args:
        batch_size: rows of the global batch.
        accum_steps: micro-batches per step and rank.
        world_size: ranks the batch is split over.
        caller: the name at the start of error messages.
        names: what the caller calls the batch size and the accumulation steps (e.g. its flags).

    Raises:
        ValueError: naming ``caller``, the numbers that do not divide, and a value that would.

    Example:
        >>> rows_per_microbatch(32, 4, 2, caller="example")
        4
    """
    batch_name, accum_name = names
    for name, value in ((batch_name, batch_size), (accum_name, accum_steps), ("world size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{caller}: {name} must be an integer >= 1, got {value!r}.")
    if batch_size % world_size:
        fit = -(-batch_size // world_size) * world_size
        raise ValueError(f"{caller}: {batch_name} {batch_size} (the global batch) does not divide by the "
                         f"{world_size} ranks; use a multiple of {world_size}, e.g. {batch_name} {fit}.")
    rows = batch_size // world_size
    if rows % accum_steps:
        fitting = next(k for k in (4, 2, 1) if rows % k == 0)
        what = f"{batch_name} {batch_size}" if world_size == 1 else f"the {rows} rows of each of {world_size} ranks"
        raise ValueError(f"{caller}: {accum_name} {accum_steps} does not divide {what}; choose a divisor so "
                         f"every micro-batch has the same rows (e.g. {accum_name} {fitting}).")
    return rows // accum_steps


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
