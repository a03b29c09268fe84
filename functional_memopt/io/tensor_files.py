"""Safetensors files that verify themselves: a canonical header, an embedded sha256, a size bound.

Every safetensors file this library writes goes through :func:`atomic_save_safetensors`: its
metadata keys are sorted (safetensors itself writes them in hash-map order, which differs between
processes, so identical content gave different bytes), and the metadata holds the file's own
sha256 under ``functional_memopt.sha256``. The digest is taken over the whole file with that value
set to 64 zeros, then written in its place: the header keeps its length, and identical content
still gives identical bytes. :func:`open_safetensors` recomputes it before any tensor is read, so a
flipped bit anywhere (header or data) is reported with the file's name; files without the key
(Hugging Face files, files of earlier versions) are read unverified. It also refuses a file whose
declared tensors exceed the machine's memory, before reading them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_write, check_fits_in_memory

__all__ = ["DIGEST_KEY", "atomic_save_safetensors", "open_safetensors", "read_header", "file_digest",
           "declared_bytes", "verify_digest"]

DIGEST_KEY = "functional_memopt.sha256"
_PLACEHOLDER = "0" * 64
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's length
_CHUNK = 4 * 2**20
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str) -> tuple[int, dict]:
    """``(n, header)``: the header's length in bytes and its parsed JSON; ValueError if unreadable."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("the file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, os.path.getsize(path) - 8):
            raise ValueError(f"the header length {n} does not fit in the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return n, header


def declared_bytes(header: dict, *, itemsize: int | None = None) -> int:
    """Bytes the header's tensors take (each element ``itemsize`` bytes when given, e.g. 4 for float32)."""
    total = 0
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict):
            continue
        shape = entry.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {key!r} has an invalid shape {shape!r}")
        total += math.prod(shape) * (itemsize or _ITEMSIZE.get(entry.get("dtype"), 8))
    return total


def _hash_file(path: str, n: int, header_bytes: bytes) -> str:
    """sha256 of the file with its header replaced by ``header_bytes`` (the same length ``n``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(8))
        f.seek(8 + n)
        h.update(header_bytes)
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            got = f.readinto(buf)
            if not got:
                break
            h.update(view[:got])
    return h.hexdigest()


def _field(value: str) -> bytes:
    return json.dumps(DIGEST_KEY).encode() + b":" + json.dumps(value).encode()


def _seal(tmp: str) -> str:
    """Sort the metadata of the safetensors file ``tmp`` and write its digest in place; returns it."""
    n, header = read_header(tmp)
    meta = dict(sorted((header.pop("__metadata__", None) or {}).items()))
    canon = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"), ensure_ascii=False).encode()
    if len(canon) > n:  # safetensors' own header never has more than this one
        raise ValueError(f"the canonical header ({len(canon)} bytes) is longer than the written one ({n})")
    canon += b" " * (n - len(canon))  # safetensors pads the header with spaces too
    digest = _hash_file(tmp, n, canon)
    sealed = canon.replace(_field(_PLACEHOLDER), _field(digest))
    with open(tmp, "r+b") as f:
        f.seek(8)
        f.write(sealed)
    return digest


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                            caller: str, kind: str | None = None) -> str:
    """``save_file(tensors, path, metadata)`` through ``atomic_write``, sorted and sealed; returns the sha256.

    Example:
        >>> atomic_save_safetensors("w.safetensors", {"w": torch.ones(2)}, {}, caller="example")  # doctest: +SKIP
    """
    metadata = {**metadata, DIGEST_KEY: _PLACEHOLDER}
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + 1024 + len(json.dumps(metadata))
    digest = []

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        digest.append(_seal(tmp))

    atomic_write(path, write, caller=caller, kind=kind, size_hint=size)
    return digest[0]


def file_digest(path: str) -> tuple[str | None, str | None]:
    """``(recorded, computed)`` sha256 of a sealed file; ``(None, None)`` for a file without one."""
    n, header = read_header(path)
    meta = header.get("__metadata__") or {}
    recorded = meta.get(DIGEST_KEY)
    if recorded is None:
        # A flipped bit in the key's own name leaves a seal under another name of the same length:
        # that file is damaged, not one of the unsealed files (Hugging Face's, earlier versions').
        renamed = [v for k, v in meta.items() if len(k) == len(DIGEST_KEY) and isinstance(v, str)
                   and len(v) == len(_PLACEHOLDER) and all(c in "0123456789abcdef" for c in v)]
        return (renamed[0], "a header whose seal is under another name") if renamed else (None, None)
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    if not isinstance(recorded, str) or raw.count(_field(recorded)) != 1:
        return str(recorded), "a header that does not hold it once"
    return recorded, _hash_file(path, n, raw.replace(_field(recorded), _field(_PLACEHOLDER)))


def verify_digest(path: str, *, caller: str, expected: str | None = None, what: str | None = None) -> str | None:
    """Check a sealed file's embedded sha256 (and that it equals ``expected`` when given); returns it.

    Raises:
        ValueError: naming the file (and ``what`` it is) when the contents changed after writing.
    """
    recorded, computed = file_digest(path)
    label = f"{what} {path!r}" if what else repr(path)
    if recorded is not None and recorded != computed:
        raise ValueError(
            f"{caller}: {label} is damaged: its contents do not match the sha256 written with it (recorded "
            f"{recorded[:16]}..., now {str(computed)[:16]}...); a bit changed on disk or in a copy. Restore it "
            "from a good copy; it was not read."
        )
    if expected is not None and recorded != expected:
        raise ValueError(
            f"{caller}: {label} is not the file its record names (sha256 {str(recorded)[:16]}..., expected "
            f"{expected[:16]}...); it was replaced or damaged after it was written. It was not read."
        )
    return recorded


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, *, caller: str, verify: bool = True, itemsize: int | None = None,
                     expected_digest: str | None = None, what: str | None = None):
    """``safe_open(path)`` (memory-mapped) after the checks, with clear errors.

    Args:
        path: the file.
        caller: the name at the start of error messages.
        verify: check the embedded sha256 (when the file has one) before anything is read.
        itemsize: bytes per element once loaded (e.g. 4 when every tensor becomes float32), for the
            memory bound; None counts the stored bytes.
        expected_digest: the sha256 a record (e.g. a checkpoint's state.json) gives for this file.
        what: what the file is, for messages (e.g. "the tensor file of the checkpoint at step 30").
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{caller}: no file at {path!r}; check the path.")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
        _, header = read_header(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{caller}: {what + ' ' if what else ''}{path!r} is not a valid safetensors file ({err}); it may be truncated or "
            "corrupted (e.g. an interrupted copy). Save or download it again."
        ) from None
    with handle as f:
        check_fits_in_memory(declared_bytes(header, itemsize=itemsize), caller=caller, source=repr(path))
        if verify or expected_digest is not None:
            verify_digest(path, caller=caller, expected=expected_digest, what=what)
        yield f
