"""Train-state checkpoints for exact resume: every tensor of a TrainState, bit for bit.

A checkpoint in a run directory is two files::

    state-<step>-<id>.safetensors   every tensor leaf (fp32 params, optimizer and loss-scale state,
                                    step), each in its own dtype, keyed by its named tree path
    state.json                      names that file and holds the config, the caller's meta (e.g.
                                    the next batch index) and the format versions

``state.json`` is written last and is the commit point: the tensor file of a new checkpoint gets a
new name, so until the JSON is replaced (atomically) it still names the previous, complete tensor
file. A crash at any moment leaves the old checkpoint or the new one, never a mix. Tensor files no
longer named are removed after the commit.

The tree structure is not stored as code: :func:`load_checkpoint` rebuilds it from ``like``, a
TrainState made by ``init_train_state`` for the same config, optimizer and loss scale. (The shape
of an optimizer's state is a property of its code; a pickled treedef would tie files to class
paths and be unsafe to open.) ``state.json`` lists every key with its dtype and shape, so a
checkpoint of another configuration is refused key by key.

Verified on load: ``state.json``'s own sha256 (``json_sha256``) and its fields by type and range; the tensor file's sha256, recorded in
``state.json`` (and sealed into the file itself), before any tensor is read; then the values:
finite, and the state's invariants (``invariants.check_state``: optimizer counts equal ``step``,
second moments >= 0, a consistent loss scale). A checkpoint written before checksums existed (no
``sha256`` field) still loads: its values are checked, its bytes cannot be.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from typing import Any

import optree
import torch

from .._dtypes import dtype_name
from .._tree import tree_flatten_with_paths, tree_from_paths
from .._version import __version__
from ..model.config import ModelConfig
from ..model.layout import check_params
from .files import (atomic_write_json, check_finite, check_json_seal, disk_full_error, is_disk_full, leftovers,
                    write_phase)
from .invariants import check_state
from .tensor_files import atomic_save_safetensors, open_safetensors

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_checkpoint_params",
    "checkpoint_info",
    "has_checkpoint",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "STATE_JSON",
    "TEMPORARY_TARGETS",
]

CHECKPOINT_FORMAT = "functional_memopt.checkpoint"
CHECKPOINT_VERSION = 1  # bump when the layout changes; readers refuse newer versions
STATE_JSON = "state.json"
_TENSOR_FILE = re.compile(r"^state-\d+-[0-9a-f]+\.safetensors$")
TEMPORARY_TARGETS = (STATE_JSON, re.compile(r"state-\d+-[0-9a-f]+\.safetensors"))  # what leftovers may be of
_HEX = re.compile(r"^[0-9a-f]+$")
_SHOWN = 8  # keys listed per category in a mismatch message


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _write_json(path: str, record: dict) -> None:
    atomic_write_json(path, record, caller="save_checkpoint", indent=1, seal=True)


def save_checkpoint(run_dir: str | os.PathLike, state: Any, *, cfg: ModelConfig, meta: dict | None = None,
                    parallel: Any = None, optimizer: Any = None) -> str:
    """Write ``state`` into ``run_dir`` as a checkpoint that resumes bit for bit, atomically.

    Args:
        run_dir: an existing folder; a previous checkpoint there is replaced only once the new one
            is complete.
        state: a TrainState (any pytree of tensors works); every value must be finite.
        cfg: the model config, stored so a checkpoint of another config is recognised.
        meta: JSON-serialisable extras returned by :func:`load_checkpoint`, e.g. the next batch index.
        parallel, optimizer: a data-parallel run's Parallelism and optimizer. Every rank calls this;
            the state is gathered into the single-process layout on rank 0, which writes it, and a
            failed write raises on every rank. The files then load in one process or on any number
            of ranks, at any ZeRO stage.

    Returns:
        The path of ``state.json``.

    Example:
        >>> save_checkpoint("runs/a", state, cfg=cfg, meta={"batch_index": 100})  # doctest: +SKIP
    """
    run_dir = os.fspath(run_dir)
    if parallel is not None:
        if optimizer is None:
            raise ValueError("save_checkpoint: a data-parallel state needs optimizer= to gather its optimizer state.")
        full = parallel.gather(state, optimizer, dst=0)
        parallel.on_main(lambda: save_checkpoint(run_dir, full, cfg=cfg, meta=meta), what="writing the checkpoint")
        return os.path.join(run_dir, STATE_JSON)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"save_checkpoint: cfg must be a ModelConfig, got {type(cfg).__name__}.")
    if not os.path.isdir(run_dir):
        raise ValueError(f"save_checkpoint: {run_dir!r} is not a directory; create it first (nothing was written).")
    meta = dict(meta or {})
    try:
        meta_text = json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"save_checkpoint: meta must be JSON-serialisable ({err}); pass plain numbers and strings."
        ) from None
    flat = tree_flatten_with_paths(state)
    bad = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"save_checkpoint: every leaf must be a tensor; not tensors: {_listing(bad)}.")
    check_finite({k: v.detach() for k, v in flat.items()}, caller="save_checkpoint",
                 source="the state to save (nothing was written; a previous checkpoint is kept)")
    tensors, seen = {}, set()
    for k, v in flat.items():
        t = v.detach().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    step = int(flat["step"]) if "step" in flat and flat["step"].numel() == 1 else 0
    ckpt_id = uuid.uuid4().hex[:16]
    name = f"state-{step:09d}-{ckpt_id}.safetensors"
    tensor_path = os.path.join(run_dir, name)
    file_meta = {
        "format": "pt", "functional_memopt.format": CHECKPOINT_FORMAT, "functional_memopt.checkpoint_id": ckpt_id,
        "functional_memopt.step": str(step),
    }
    try:
        digest = atomic_save_safetensors(tensor_path, tensors, file_meta, caller="save_checkpoint", kind="checkpoint")
    except OSError as err:
        raise _kept(err, run_dir) from None
    record = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "library_version": __version__,
        "id": ckpt_id,
        "tensors": name,
        "bytes": os.path.getsize(tensor_path),
        "sha256": digest,
        "step": step,
        "config": cfg.to_dict(),
        "leaves": {k: [dtype_name(v.dtype), list(v.shape)] for k, v in flat.items()},
        "structure": str(optree.tree_structure(state)),
        "meta": json.loads(meta_text),
    }
    json_path = os.path.join(run_dir, STATE_JSON)
    try:
        _write_json(json_path, record)  # the commit point
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tensor_path)  # named by no state.json
        raise _kept(err, run_dir) from None
    write_phase("checkpoint", "committed", json_path)
    stale = [e for e in os.listdir(run_dir) if _TENSOR_FILE.match(e) and e != name]
    for other in stale + leftovers(run_dir, TEMPORARY_TARGETS):  # older tensor files, crash leftovers
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(run_dir, other))
    return json_path


def _kept(err: OSError, run_dir: str) -> OSError:
    """A failed save's error, saying which checkpoint is still in place."""
    if not is_disk_full(err):
        return err
    try:
        kept = f"the previous checkpoint (step {checkpoint_info(run_dir)['step']}) is intact"
    except (OSError, ValueError, KeyError):
        kept = "no earlier checkpoint was there"
    text = str(err.strerror or err).removeprefix("save_checkpoint: ")
    return disk_full_error(f"save_checkpoint: {text.rstrip('.')}; {kept} in {run_dir!r}.")


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a checkpoint's ``state.json``."""
    return os.path.isfile(os.path.join(os.fspath(run_dir), STATE_JSON))


def checkpoint_info(run_dir: str | os.PathLike) -> dict:
    """The parsed ``state.json`` of the checkpoint in ``run_dir`` (config, step, meta, ...)."""
    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, STATE_JSON)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"load_checkpoint: no directory at {run_dir!r}; check the path.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: {run_dir!r} holds no checkpoint ({STATE_JSON} is missing).")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_checkpoint: {path!r} is corrupted, not valid JSON ({err}).") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_checkpoint: {path!r} is not a functional_memopt checkpoint record.")
    check_json_seal(record, caller="load_checkpoint", path=path)
    version = record.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(
            f"load_checkpoint: {path!r} has format version {version!r}; this functional_memopt "
            f"({__version__}) reads versions up to {CHECKPOINT_VERSION}. Upgrade functional_memopt."
        )
    _check_record(record, path)
    return record


def _check_record(record: dict, path: str) -> None:
    """Every field of a state.json by type and range; ValueError naming the first bad one."""

    def bad(key: str, want: str) -> ValueError:
        got = record.get(key, None)
        what = "is missing" if key not in record else f"is {got!r}" if len(repr(got)) < 80 else f"is a {type(got).__name__}"
        return ValueError(f"load_checkpoint: {path!r} is damaged: the field {key!r} {what}, expected {want}; "
                          "restore the run directory from a copy or start a new run.")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {
        "tensors": (lambda v: isinstance(v, str) and bool(_TENSOR_FILE.match(v)), "a file name state-<step>-<id>.safetensors"),
        "id": (lambda v: isinstance(v, str) and bool(_HEX.match(v)), "a hexadecimal id"),
        "leaves": (lambda v: isinstance(v, dict) and all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], list)
            and all(is_int(d) and d >= 0 for d in x[1]) for x in v.values()), "{key: [dtype, shape]}"),
        "config": (lambda v: isinstance(v, dict), "a JSON object (the model config)"),
        "meta": (lambda v: isinstance(v, dict), "a JSON object"),
        "step": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    }
    for key, (ok, want) in checks.items():
        if key == "step" and key not in record:
            continue  # optional for any pytree; a TrainState's step is also a leaf
        if not ok(record.get(key)):
            raise bad(key, want)
    if "sha256" in record and not (isinstance(record["sha256"], str) and len(record["sha256"]) == 64
                                   and _HEX.match(record["sha256"])):
        raise bad("sha256", "64 hexadecimal digits")
    if "bytes" in record and not (is_int(record["bytes"]) and record["bytes"] >= 0):
        raise bad("bytes", "an integer >= 0")


def _config_of(record: dict, run_dir: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(record["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_checkpoint: the config in {run_dir!r} is unusable ({err}).") from None


def _read_tensors(run_dir: str, record: dict, keys: list[str], device_of: dict) -> dict[str, torch.Tensor]:
    path = os.path.join(run_dir, os.path.basename(record["tensors"]))
    what = f"the tensor file of the checkpoint at step {record.get('step', '?')}"
    with open_safetensors(path, caller="load_checkpoint", expected_digest=record.get("sha256"), what=what) as f:
        if (f.metadata() or {}).get("functional_memopt.checkpoint_id") != record["id"]:
            raise ValueError(
                f"load_checkpoint: {path!r} does not belong to {STATE_JSON} (checkpoint ids differ); "
                "the run directory was mixed from two checkpoints."
            )
        stored = set(f.keys())
        absent = [k for k in keys if k not in stored]
        if absent:
            raise ValueError(
                f"load_checkpoint: {path!r} is corrupted: keys listed in {STATE_JSON} are missing: {_listing(absent)}."
            )
        return {k: f.get_tensor(k).to(device_of.get(k, "cpu")) for k in keys}


def load_checkpoint(
    run_dir: str | os.PathLike, like: Any, *, cfg: ModelConfig | None = None, parallel: Any = None,
    optimizer: Any = None,
) -> tuple[Any, dict]:
    """Read the checkpoint in ``run_dir`` into a state shaped like ``like``, bit for bit.

    Args:
        run_dir: a folder written by :func:`save_checkpoint`.
        like: a state of the same structure, e.g. ``init_train_state(init_params(cfg), optimizer,
            loss_scale=..., policy=...)``; each leaf is loaded onto ``like``'s device for it.
        cfg: when given, the stored config must equal it (the differing fields are named).
        parallel, optimizer: a data-parallel run's Parallelism and optimizer: every rank reads the
            single-process state and keeps its own shard, so a checkpoint from any world size or
            ZeRO stage (or from one process) resumes here.

    Returns:
        (state, meta): the state, and the ``meta`` dict given to :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no checkpoint there. ValueError: corrupted files, another config
        (mismatched keys, shapes and dtypes are listed), or non-finite values (leaves named).

    Example:
        >>> state, meta = load_checkpoint("runs/a", init_train_state(params, opt))  # doctest: +SKIP
    """
    run_dir = os.fspath(run_dir)
    if parallel is not None and parallel.zero_stage > 0:
        if optimizer is None:
            raise ValueError("load_checkpoint: a sharded state needs optimizer= to read the whole optimizer state.")
        full, meta = load_checkpoint(run_dir, _full_like(like, optimizer), cfg=cfg)
        return parallel.shard(full, optimizer), meta
    record = checkpoint_info(run_dir)
    stored_cfg = _config_of(record, run_dir)
    if cfg is not None and stored_cfg != cfg:
        want, got = cfg.to_dict(), stored_cfg.to_dict()
        diff = [f"{k}: checkpoint {got[k]!r}, expected {want[k]!r}" for k in want if want[k] != got.get(k)]
        raise ValueError(
            f"load_checkpoint: the checkpoint in {run_dir!r} is for another model config ({'; '.join(diff)}); "
            "resume it with its own config or start a new run."
        )
    flat_like = tree_flatten_with_paths(like)
    want = {k: [dtype_name(v.dtype), list(v.shape)] for k, v in flat_like.items()}
    have = record["leaves"]
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k}: checkpoint {have[k][0]}{have[k][1]}, expected {want[k][0]}{want[k][1]}"
             for k in want if k in have and have[k] != want[k]]
    if missing or unexpected or wrong:
        parts = [f"missing keys [{_listing(missing)}]"] * bool(missing)
        parts += [f"unexpected keys [{_listing(unexpected)}]"] * bool(unexpected)
        parts += [f"mismatched dtypes/shapes [{_listing(wrong)}]"] * bool(wrong)
        raise ValueError(
            f"load_checkpoint: the checkpoint in {run_dir!r} does not match the expected state "
            f"(another model config, optimizer, loss scale or precision policy): {'; '.join(parts)}."
        )
    devices = {k: v.device for k, v in flat_like.items()}
    flat = _read_tensors(run_dir, record, list(want), devices)
    source = f"the checkpoint in {run_dir!r} (step {record.get('step', '?')})"
    check_finite(flat, caller="load_checkpoint", source=source)
    state = optree.tree_unflatten(optree.tree_structure(like), [flat[k] for k in want])
    check_state(state, caller="load_checkpoint", source=source)
    return state, dict(record["meta"])


def _full_like(like, optimizer):
    """``like`` with the single-process optimizer state as zero-stride tensors: shapes, no memory."""
    device = optree.tree_leaves(like.params)[0].device
    meta = optree.tree_map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"), like.params)
    opt = optree.tree_map(lambda x: torch.zeros((), dtype=x.dtype, device=device).expand(x.shape), optimizer.init(meta))
    return like._replace(opt_state=opt)


def load_checkpoint_params(run_dir: str | os.PathLike, *, device=None) -> tuple[dict, ModelConfig]:
    """Only the (float32) params of the checkpoint in ``run_dir``, with its config: enough to sample."""
    run_dir = os.fspath(run_dir)
    record = checkpoint_info(run_dir)
    cfg = _config_of(record, run_dir)
    keys = [k for k in record["leaves"] if k.startswith("params.")]
    flat = _read_tensors(run_dir, record, keys, {k: device or "cpu" for k in keys})
    check_finite(flat, caller="load_checkpoint", source=f"the checkpoint in {run_dir!r}")
    params = tree_from_paths({k.removeprefix("params."): v for k, v in flat.items()})
    try:
        check_params(params, cfg)
    except ValueError as err:
        raise ValueError(f"load_checkpoint: the params in {run_dir!r} do not match its config ({err}).") from None
    return params, cfg
