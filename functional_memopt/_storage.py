"""Params files: one safetensors file per params tree, written atomically, read memory-mapped.

Keys are the tree's dotted paths ("h.0.attn.c_attn.weight"); the tied leaf ``wte`` is one key,
serving as embedding and output head. The metadata holds the config as JSON, the stored dtype and
the format's name and version, so a file alone rebuilds the model. Half precision (fp16 by
default) halves the file; loading returns fp32 masters unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._config import ModelConfig
from ._model import check_params, param_shapes
from ._tree import tree_flatten_with_paths
from ._version import __version__

__all__ = ["save_params", "load_params", "atomic_write", "atomic_write_json", "atomic_save_safetensors", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "functional_memopt.params"  # metadata "functional_memopt.format"
FORMAT_VERSION = 1  # bump when the layout changes; readers refuse newer versions

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _umask() -> int:
    # Files made by mkstemp are 0600; a checkpoint should get the permissions open() would give.
    # Linux reports the umask without changing it; elsewhere set-and-restore is the only way.
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_dtype(dtype: torch.dtype | str, *, caller: str) -> torch.dtype:
    """``dtype`` (a torch dtype or a name such as "fp16", "bf16", "float32") as a torch dtype."""
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return dtype
    raise ValueError(
        f"{caller}: dtype must be torch.float16, torch.bfloat16 or torch.float32 (or 'fp16', 'bf16', "
        f"'fp32'), got {dtype!r}."
    )


def _check_folder(path: str, caller: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(
            f"{caller}: the folder {folder!r} for {os.path.basename(path)!r} does not exist; "
            "create it first (nothing was written)."
        )
    if os.path.isdir(path):
        raise ValueError(f"{caller}: {path!r} is a directory; pass a file path such as 'model.safetensors'.")
    return folder


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None], *, caller: str = "atomic_write") -> None:
    """Create or replace the file ``path`` whole, or leave it as it was.

    ``write_fn`` writes the complete file at a temporary path in the same folder; it is then
    flushed to disk, renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows) and
    the folder entry is flushed too, so a crash at any moment leaves the old file or the new one.
    On any error the temporary file is removed.

    Args:
        path: the file to write; its folder must exist.
        write_fn: called with the temporary path (a str); must write the whole file there.
        caller: name used at the start of error messages.

    Example:
        >>> atomic_write("notes.txt", lambda tmp: open(tmp, "w").write("hello"))  # doctest: +SKIP
    """
    path = os.fspath(path)
    folder = _check_folder(path, caller)
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.close(fd)
        write_fn(tmp)
        _fsync_path(tmp, os.O_RDWR)  # the data reaches the disk before the rename can
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # the rename itself survives a power cut only once the folder is flushed
        _fsync_path(folder, os.O_RDONLY)


def atomic_write_json(path: str | os.PathLike, record: dict, *, caller: str = "atomic_write_json",
                      indent: int = 2) -> None:
    """Write ``record`` as a JSON file (sorted keys) through :func:`atomic_write`."""
    text = json.dumps(record, indent=indent, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, caller=caller)


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, caller: str
) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), caller=caller)


def _magnitudes(flat: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each floating leaf's largest magnitude (inf or nan when the leaf holds one), one host sync.

    ``aminmax`` reads each leaf once without a temporary; ``isfinite(x).all()`` measured ~30x
    slower on 124M fp32 values on the CPU (it materialises a bool tensor).
    """
    floats = {k: v.detach() for k, v in flat.items() if v.is_floating_point() and v.numel()}
    if not floats:
        return {}
    mm = [torch.aminmax(v) for v in floats.values()]
    peaks = torch.stack([torch.maximum(lo.abs(), hi.abs()).double() for lo, hi in mm]).cpu().tolist()
    return dict(zip(floats, peaks))


def prepare_tensors(flat: dict[str, torch.Tensor], dtype: torch.dtype, *, caller: str) -> dict[str, torch.Tensor]:
    """Leaves cast once to ``dtype``, contiguous and not sharing memory, ready for safetensors.

    Raises ValueError naming the leaves that are non-finite or beyond ``dtype``'s range (casting
    would turn them into inf), before anything is written.
    """
    peaks = _magnitudes(flat)
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


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, *, caller: str):
    """``safe_open(path)`` (memory-mapped) with clear errors for missing or corrupted files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{caller}: no file at {path!r}; check the path.")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{caller}: {path!r} is not a valid safetensors file ({err}); it may be truncated or "
            "corrupted (e.g. an interrupted copy). Save or download it again."
        ) from None
    with handle as f:
        yield f


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, *, caller: str, source: str) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped keys against ``cfg``."""
    want = param_shapes(cfg)
    missing = [k for k in want if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in want)
    wrong = [f"{k}: expected {want[k]}, got {shapes[k]}" for k in want if k in shapes and shapes[k] != want[k]]
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {unexpected}"] * bool(unexpected)
        parts += ["wrong shapes [" + "; ".join(wrong) + "]"] * bool(wrong)
        raise ValueError(f"{caller}: {source} does not match the config {cfg}: " + "; ".join(parts) + ".")


def check_finite(flat: dict[str, torch.Tensor], *, caller: str, source: str) -> None:
    """Raise ValueError naming the leaves of ``flat`` that hold inf or nan."""
    bad = [k for k, m in _magnitudes(flat).items() if not (m < float("inf"))]
    if bad:
        raise ValueError(f"{caller}: {source} holds inf or nan values in {bad}; the checkpoint is unusable.")


def nest_paths(flat: dict[str, torch.Tensor]) -> dict:
    """The nested dict (lists where keys are 0..n-1) whose dotted paths are the keys of ``flat``."""
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


def save_params(path: str | os.PathLike, params: dict, cfg: ModelConfig, *, dtype: torch.dtype | str = torch.float16) -> None:
    """Write ``params`` and ``cfg`` to one safetensors file, atomically.

    Args:
        path: the file to write (its folder must exist); an existing file is replaced only once
            the new one is complete.
        params: tree from :func:`init_params` matching ``cfg``, all values finite.
        cfg: the model config, stored as JSON in the metadata.
        dtype: stored dtype, torch.float16 (default), torch.bfloat16 or torch.float32 (or "fp16",
            "bf16", "fp32"). Values beyond fp16's range (|x| > 65504) need bf16 or fp32.

    Example:
        >>> cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32)
        >>> save_params("model.safetensors", init_params(cfg), cfg)  # doctest: +SKIP
        >>> params, cfg = load_params("model.safetensors")  # doctest: +SKIP
    """
    dtype = resolve_dtype(dtype, caller="save_params")
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"save_params: cfg must be a ModelConfig, got {type(cfg).__name__}.")
    path = os.fspath(path)
    _check_folder(path, "save_params")  # fail before the (possibly long) cast
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
        "functional_memopt.dtype": str(dtype).removeprefix("torch."),
    }
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
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype, caller="load_params")
    path = os.fspath(path)
    with open_safetensors(path, caller="load_params") as f:
        cfg = _config_from_metadata(f.metadata() or {}, path)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_shapes(shapes, cfg, caller="load_params", source=repr(path))
        flat = {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in param_shapes(cfg)}
    check_finite(flat, caller="load_params", source=repr(path))
    params = nest_paths(flat)
    check_params(params, cfg)
    return params, cfg
