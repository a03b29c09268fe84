"""The JSON records of a run directory, read as untrusted input: every field checked by type and range.

``config.json`` (the run's :class:`TrainArgs`, :class:`Resolved` and model) and the ``meta`` the
loop stores in each checkpoint's ``state.json`` are read back on ``--resume`` and by ``memopt
verify``. A damaged field is a one-line ValueError naming the file and the field, what was
expected and what came, never an error from deep inside the run.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from ..model.config import ACTIVATIONS, ATTENTION_KERNELS, ModelConfig
from .run import Resolved, TrainArgs, check_model_fits

__all__ = ["parse_run_config", "parse_meta"]

_INT, _FLOAT, _STR = "an integer", "a number", "a string"
_CHUNK = 'an integer >= 1 or "cce"'


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# field -> (kind, optional, range check, range text)
_TRAIN = {
    "preset": (_STR, False, None, ""),
    "n_layer": (_INT, True, lambda v: v >= 1, ">= 1"),
    "n_head": (_INT, True, lambda v: v >= 1, ">= 1"),
    "n_embd": (_INT, True, lambda v: v >= 1, ">= 1"),
    "block_size": (_INT, True, lambda v: v >= 1, ">= 1"),
    "policy": (_STR, False, None, ""),
    "loss_scale": (_STR, False, None, ""),
    "batch_size": (_INT, False, lambda v: v >= 1, ">= 1"),
    "accum_steps": (_INT, True, lambda v: v >= 1, ">= 1"),
    "seq_len": (_INT, True, lambda v: v >= 1, ">= 1"),
    "remat": (_STR, False, None, ""),
    "lr": (_FLOAT, False, lambda v: v >= 0, ">= 0"),
    "min_lr": (_FLOAT, True, lambda v: v >= 0, ">= 0"),
    "warmup_steps": (_INT, True, lambda v: v >= 0, ">= 0"),
    "schedule": (_STR, False, lambda v: v in ("cosine", "constant"), "cosine or constant"),
    "weight_decay": (_FLOAT, False, lambda v: v >= 0, ">= 0"),
    "beta1": (_FLOAT, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (_FLOAT, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (_FLOAT, False, lambda v: v >= 0, ">= 0"),
    "steps": (_INT, False, lambda v: v >= 1, ">= 1"),
    "stop_at": (_INT, True, lambda v: v >= 1, ">= 1"),
    "eval_interval": (_INT, True, lambda v: v >= 1, ">= 1"),
    "eval_batches": (_INT, False, lambda v: v >= 1, ">= 1"),
    "corpus": (_STR, True, None, ""),
    "seed": (_INT, False, None, ""),
    "device": (_STR, False, None, ""),
    "threads": (_STR, False, None, ""),
    "gc_every": (_INT, False, lambda v: v >= 0, ">= 0"),
    "zero_stage": (_INT, False, lambda v: v in (0, 1, 2), "0, 1 or 2"),
    "dist_timeout": (_FLOAT, False, lambda v: v > 0, "> 0"),
    "loss_chunk": (_STR, False, lambda v: v in ("auto", "none", "cce") or (v.isdigit() and int(v) >= 1),
                   "auto, none, cce or a whole number >= 1"),
    "compile": (_STR, False, lambda v: v in ("auto", "on", "off"), "auto, on or off"),
}
_RESOLVED = {
    "policy": (_STR, False, None, ""),
    "loss_scale": (_STR, False, None, ""),
    "accum_steps": (_INT, False, lambda v: v >= 1, ">= 1"),
    "seq_len": (_INT, False, lambda v: v >= 1, ">= 1"),
    "warmup_steps": (_INT, False, lambda v: v >= 0, ">= 0"),
    "eval_interval": (_INT, False, lambda v: v >= 1, ">= 1"),
    "threads": (_INT, False, lambda v: v >= 1, ">= 1"),
    "loss_chunk": (_CHUNK, True, lambda v: v == "cce" or v >= 1, ""),
    "compile": ("true or false", False, None, ""),
}
# Fields that later versions added: a run recorded before them takes their defaults.
_ADDED = {"loss_chunk", "compile", "activation", "attention", "metrics_sha256"}
_MODEL = {
    **{k: (_INT, False, lambda v: v >= 1, ">= 1") for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                                            "mlp_ratio")},
    "bias": ("true or false", False, None, ""),
    "layer_norm_eps": (_FLOAT, False, lambda v: v > 0, "> 0"),
    "init_std": (_FLOAT, False, lambda v: v > 0, "> 0"),
    "activation": (_STR, False, lambda v: v in ACTIVATIONS, " or ".join(ACTIVATIONS)),
    "attention": (_STR, False, lambda v: v in ATTENTION_KERNELS, ", ".join(ATTENTION_KERNELS)),
}
_KIND_OK = {_INT: _is_int, _FLOAT: _is_num, _STR: lambda v: isinstance(v, str),
            _CHUNK: lambda v: _is_int(v) or v == "cce",
            "true or false": lambda v: isinstance(v, bool)}


def _damaged(path: str, field: str, got: Any, want: str) -> ValueError:
    shown = "missing" if got is _MISSING else repr(got) if len(repr(got)) <= 60 else f"a {type(got).__name__}"
    return ValueError(f"train: {path!r} is damaged: {field} is {shown}, expected {want}; restore the file from a copy "
                      "(or start a new run).")


_MISSING = object()


def _fields(section: Any, rules: dict, path: str, prefix: str, *, partial: bool = False) -> dict:
    if not isinstance(section, dict):
        raise _damaged(path, prefix.rstrip("."), section if section is not None else _MISSING, "a JSON object")
    unknown = sorted(set(section) - set(rules))
    if unknown:
        raise _damaged(path, prefix + unknown[0], section[unknown[0]], f"no such field (known: {', '.join(rules)})")
    out = {}
    for name, (kind, optional, ok, text) in rules.items():
        if name not in section:
            if partial or name in _ADDED:
                continue
            raise _damaged(path, prefix + name, _MISSING, kind + (f" {text}" if text else ""))
        value = section[name]
        if value is None and optional:
            out[name] = None
            continue
        want = kind + (f" {text}" if text else "") + (" or null" if optional else "")
        if not _KIND_OK[kind](value) or (ok is not None and not ok(value)):
            raise _damaged(path, prefix + name, value, want)
        out[name] = value
    return out


def parse_run_config(record: dict, run_dir: str) -> tuple[TrainArgs, Resolved, ModelConfig]:
    """``(args, resolved, cfg)`` from a parsed config.json, every field checked; ValueError naming a bad one."""
    path = os.path.join(run_dir, "config.json")
    for key in ("train", "resolved", "model"):
        if key not in record:
            raise _damaged(path, key, _MISSING, "a JSON object")
    # Fields added by later versions of TrainArgs get their defaults when a run predates them.
    args = TrainArgs(**_fields(record["train"], _TRAIN, path, "train.", partial=True))
    resolved = Resolved(**_fields(record["resolved"], _RESOLVED, path, "resolved."))
    model = _fields(record["model"], _MODEL, path, "model.")
    try:
        cfg = ModelConfig(**model)
    except (TypeError, ValueError) as err:
        raise ValueError(f"train: {path!r} is damaged: its model is not a valid config ({err}); restore the file "
                         "from a copy (or start a new run).") from None
    check_model_fits(cfg, caller="train", source=f"{path!r} (model)")
    if resolved.seq_len > cfg.block_size:
        raise _damaged(path, "resolved.seq_len", resolved.seq_len, f"at most model.block_size ({cfg.block_size})")
    if resolved.warmup_steps > args.steps:
        raise _damaged(path, "resolved.warmup_steps", resolved.warmup_steps, f"at most train.steps ({args.steps})")
    history = record.get("steps_history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _damaged(path, "steps_history", history, "a list of {at_step, steps_before, steps_after}")
    return args, resolved, cfg


_META = {
    "batch_index": (_INT, False, lambda v: v >= 0, ">= 0"),
    "skipped": (_INT, False, lambda v: v >= 0, ">= 0"),
    "metrics_bytes": (_INT, False, lambda v: v >= 0, ">= 0"),
    "val_bpb_start": (_FLOAT, True, lambda v: v >= 0, ">= 0"),
    "val_bpb": (_FLOAT, True, lambda v: v >= 0, ">= 0"),
    "metrics_sha256": (_STR, True, lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None, "of 64 hex digits"),
}


def parse_meta(meta: Any, run_dir: str, *, step: int | None = None) -> dict:
    """The training loop's checkpoint meta from state.json, checked (``val_bpb`` may be absent: older runs).

    Args:
        meta: the ``meta`` of ``checkpoint_info``.
        run_dir: for messages.
        step: the checkpoint's TrainState step: batches consumed must equal updates applied plus
            skipped steps.
    """
    path = os.path.join(run_dir, "state.json")
    meta = dict(meta) if isinstance(meta, dict) else meta
    if isinstance(meta, dict):
        meta.setdefault("val_bpb", None)
    out = _fields(meta, _META, path, "meta.")
    if step is not None and out["batch_index"] != step + out["skipped"]:
        raise _damaged(path, "meta.batch_index", out["batch_index"],
                       f"the updates applied plus the steps skipped ({step} + {out['skipped']})")
    return out
