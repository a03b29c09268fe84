"""``memopt verify RUN_DIR``: check every file of a run directory; exit 1 on any damage.

Checked: config.json (every field); state.json (every field, and the loop's meta); the checkpoint's
tensor file (its sha256, then finite values and the training-state invariants, loaded into the
state its config describes); params.safetensors (its sha256, the step it holds, and its values
equal to the checkpoint's params in its stored dtype); metrics.jsonl (its sha256 up to the checkpoint,
as the checkpoint recorded it; one row per step, none repeated). Temporary files of interrupted writes and rows written after the
checkpoint are reported as notes: the next resume removes them, they are not damage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

from .._dtypes import parse_dtype
from .._tree import tree_flatten_with_paths
from ..io.checkpoint import STATE_JSON, checkpoint_info, load_checkpoint
from ..io.params import load_params, params_file_info
from ..io.tensor_files import verify_digest
from ..model.layout import init_params
from ..train.loss_scale import loss_scale_from_spec
from ..train.precision import get_policy
from ..train.step import init_train_state
from ..io.files import leftovers
from .setup import build_optimizer
from .records import parse_meta, parse_run_config
from .run_dir import PARAMS_FILE, TEMPORARY_RUN_FILES, read_run_config

__all__ = ["verify_run", "verify_command"]


def _short(err: Exception) -> str:
    return " ".join(str(err).split())


def _check_metrics(path: str, meta: dict | None) -> tuple[str | None, str]:
    """(problem or None, detail) for metrics.jsonl against the checkpoint's meta."""
    if not os.path.isfile(path):
        return "missing", ""
    with open(path, "rb") as f:
        data = f.read()
    upto = meta["metrics_bytes"] if meta else len(data)
    if upto > len(data):
        return f"holds {len(data)} bytes, fewer than the {upto} the checkpoint counted (truncated)", ""
    recorded = (meta or {}).get("metrics_sha256")
    if recorded and hashlib.sha256(data[:upto]).hexdigest() != recorded:
        return "its rows up to the checkpoint do not match the sha256 the checkpoint recorded (damaged or edited)", ""
    rows, seen = [], set()
    for i, line in enumerate(data[:upto].splitlines(), 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"line {i} is not valid JSON", ""
        key = (row.get("kind"), row.get("step"))
        if key in seen:
            return f"line {i} repeats the {key[0]} row of step {key[1]}", ""
        seen.add(key)
        rows.append(row)
    steps = [r.get("step") for r in rows if r.get("kind") == "train"]
    if meta and steps != list(range(1, meta["batch_index"] + 1)):
        return f"its training rows are not steps 1..{meta['batch_index']} in order", ""
    after = data[upto:].count(b"\n")
    return None, f"{len(rows)} rows" + (f"; {after} row(s) after the checkpoint, dropped on resume" if after else "")


def verify_run(run_dir: str) -> tuple[list[tuple[str, str | None, str]], list[str]]:
    """``(results, notes)``: per file ``(name, problem or None, detail)``, and remarks that are not damage."""
    results, notes = [], []
    config_path, state_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, STATE_JSON)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"verify: no directory at {run_dir!r}; check the path.")
    if not os.path.isfile(config_path) and not os.path.isfile(state_path):
        raise ValueError(f"verify: {run_dir!r} is not a memopt run directory (no config.json, no state.json).")
    parsed = None
    try:
        parsed = parse_run_config(read_run_config(run_dir), run_dir)
        results.append(("config.json", None, ""))
    except (OSError, ValueError) as err:
        results.append(("config.json", _short(err), ""))
    record = meta = None
    try:
        record = checkpoint_info(run_dir)
        meta = parse_meta(record["meta"], run_dir, step=record.get("step"))
        results.append((STATE_JSON, None, f"step {record['step']}, batch {meta['batch_index']}"))
        if "sha256" not in record:
            notes.append("the checkpoint has no checksum (an earlier version wrote it): its values are checked, "
                         "its bytes cannot be")
    except (OSError, ValueError) as err:
        results.append((STATE_JSON, _short(err), ""))
    state = None
    if record is not None:
        name = record["tensors"]
        try:
            if parsed is None:
                verify_digest(os.path.join(run_dir, name), caller="verify", expected=record.get("sha256"))
                detail = "sha256 only (config.json is unusable)"
            else:
                args, resolved, cfg = parsed
                opt, _ = build_optimizer(args, resolved.warmup_steps)
                like = init_train_state(init_params(cfg), opt, policy=get_policy(resolved.policy),
                                        loss_scale=loss_scale_from_spec(resolved.loss_scale))
                state, _ = load_checkpoint(run_dir, like, cfg=cfg)
                detail = "sha256, values and invariants" if "sha256" in record else "values and invariants"
            results.append((name, None, detail))
        except (OSError, ValueError) as err:
            results.append((name, _short(err), ""))
    params_path = os.path.join(run_dir, PARAMS_FILE)
    if os.path.isfile(params_path):
        try:
            params, _ = load_params(params_path)
            held = params_file_info(params_path)
            problem = None
            if state is not None:
                if held["step"] is not None and held["step"] != int(state.step):
                    problem = f"holds step {held['step']}, but the checkpoint holds step {int(state.step)}"
                else:
                    dtype = parse_dtype(held["dtype"] or "float32", caller="verify")
                    want = tree_flatten_with_paths(state.params)
                    got = tree_flatten_with_paths(params)
                    differ = [k for k in want if not torch.equal(got[k], want[k].to(dtype).float())]
                    if differ:
                        problem = f"its values differ from the checkpoint's params in {differ[:4]}"
                if held["step"] is None:
                    notes.append(f"{PARAMS_FILE} does not record its step (an earlier version wrote it)")
            results.append((PARAMS_FILE, problem, f"step {held['step']}, {held['dtype']}"))
        except (OSError, ValueError) as err:
            results.append((PARAMS_FILE, _short(err), ""))
    elif record is not None:
        notes.append(f"{PARAMS_FILE} is missing; `memopt train --resume {run_dir}` writes it from the checkpoint")
    problem, detail = _check_metrics(os.path.join(run_dir, "metrics.jsonl"), meta)
    results.append(("metrics.jsonl", problem, detail))
    left = leftovers(run_dir, TEMPORARY_RUN_FILES)
    if left:
        notes.append(f"{len(left)} temporary file(s) of interrupted writes ({', '.join(left[:3])}); the next resume "
                     "removes them")
    return results, notes


def verify_command(ns: argparse.Namespace) -> int:
    """Print one line per file and exit 1 when any is damaged."""
    results, notes = verify_run(ns.run_dir)
    print(f"memopt verify {ns.run_dir}")
    for name, problem, detail in results:
        print(f"  {'ok' if problem is None else 'DAMAGED':8} {name}" + (f" ({detail})" if detail and not problem else "")
              + (f": {problem}" if problem else ""))
    for note in notes:
        print(f"  note     {note}")
    damaged = [name for name, problem, _ in results if problem is not None]
    if damaged:
        print(f"memopt: error: verify: {ns.run_dir} has {len(damaged)} damaged file(s): {', '.join(damaged)}",
              file=sys.stderr)
        return 1
    print(f"memopt: {ns.run_dir} verified: {len(results)} files ok")
    return 0
