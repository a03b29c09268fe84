"""A run directory of ``memopt train`` and the files in it.

The directory holds ``config.json`` (the run's arguments and their resolved "auto" choices, see
``run.py``), ``metrics.jsonl`` (one JSON object per step and per evaluation), a resumable
checkpoint (``state.json`` + tensors, see ``io.checkpoint``) and ``params.safetensors`` (the
checkpoint's params in fp16). In a data-parallel run rank 0 writes every file; :class:`RunFiles`
does nothing on the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import torch

from ..io.checkpoint import TEMPORARY_TARGETS
from ..io.files import atomic_write_json, check_json_seal, leftovers
from ..io.params import save_params
from ..model.config import ModelConfig

__all__ = ["RUN_FORMAT", "PARAMS_FILE", "TEMPORARY_RUN_FILES", "RunFiles", "read_run_config", "prepare_run_dir",
           "remove_leftovers"]

RUN_FORMAT = "functional_memopt.run"
_RUN_FILES = ("config.json", "metrics.jsonl", "params.safetensors", "state.json")
PARAMS_FILE = "params.safetensors"


def read_run_config(run_dir: str) -> dict:
    """The parsed config.json of a run directory; ValueError when it is not one."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"train: no run directory at {run_dir!r}; check the path.")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"train: {run_dir!r} is not a memopt run directory (it has no config.json).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"train: {path!r} is not valid JSON ({err}); the run directory is damaged.") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise ValueError(f"train: {path!r} is not a memopt run config (no format {RUN_FORMAT!r}).")
    check_json_seal(record, caller="train", path=path)
    return record


def prepare_run_dir(run_dir: str, *, force: bool, dry_run: bool = False) -> None:
    """Check that ``run_dir`` may hold a new run; unless ``dry_run``, clear a previous run and create it."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"train: the run directory {run_dir!r} is a file; choose another --run-dir.")
    entries = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    if entries and not set(entries) - set(leftovers(run_dir, TEMPORARY_RUN_FILES)):  # what a killed start left
        if not dry_run:
            remove_leftovers(run_dir)
        entries = []
    if entries and not force:
        raise ValueError(
            f"train: the run directory {run_dir!r} already exists and is not empty; pass --force to "
            f"replace that run, --resume {run_dir} to continue it, or choose another --run-dir."
        )
    if entries:
        ours = set(_RUN_FILES) | {e for e in entries if e.startswith("state-") and e.endswith(".safetensors")}
        ours |= set(leftovers(run_dir, TEMPORARY_RUN_FILES))
        if "config.json" not in entries or set(entries) - ours - {e for e in entries if e.startswith(".")}:
            raise ValueError(
                f"train: {run_dir!r} holds files that are not a memopt run ({sorted(set(entries) - ours)[:5]}); "
                "--force only replaces a previous run. Choose another --run-dir."
            )
        read_run_config(run_dir)
        if dry_run:
            return
        for name in entries:
            if name in ours:
                os.unlink(os.path.join(run_dir, name))
    if not dry_run:
        os.makedirs(run_dir, exist_ok=True)


TEMPORARY_RUN_FILES = (*TEMPORARY_TARGETS, "config.json", PARAMS_FILE)  # the targets whose leftovers a run may remove


def remove_leftovers(run_dir: str) -> list[str]:
    """Remove the temporary files that interrupted writes of this project's run files left; returns their names.

    Only names of the form ``.<run file>.<random>.tmp`` (see ``io.files.leftovers``) are touched.
    """
    gone = []
    for name in leftovers(run_dir, TEMPORARY_RUN_FILES):
        try:
            os.unlink(os.path.join(run_dir, name))
            gone.append(name)
        except OSError:
            pass
    return gone


def _write_json(path: str, record: dict) -> None:
    atomic_write_json(path, record, caller="train", indent=2, seal=True)


class RunFiles:
    """config.json, metrics.jsonl and params.safetensors of one run; every method is a no-op off rank 0.

    Example:
        >>> files = RunFiles("runs/demo", main=True)  # doctest: +SKIP
        >>> files.start({"format": RUN_FORMAT, ...}, force=False); files.record({"step": 1})  # doctest: +SKIP
    """

    def __init__(self, run_dir: str, *, main: bool = True) -> None:
        self.run_dir = run_dir
        self.main = main
        self._log = None
        self._digest = hashlib.sha256()  # of the log's bytes so far

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    def start(self, config: dict, *, force: bool) -> None:
        """A new run: clear a previous one (with ``force``), write config.json, start an empty log."""
        if self.main:
            prepare_run_dir(self.run_dir, force=force)
            _write_json(os.path.join(self.run_dir, "config.json"), config)
            self._log = open(self.metrics_path, "w", encoding="utf-8")
            self._digest = hashlib.sha256()

    def reopen(self, metrics_bytes: int, sha256: str | None = None) -> str | None:
        """A resumed run: drop log lines written after the checkpoint, then append.

        Returns a warning when the rows kept do not match ``sha256`` (the checkpoint's record of
        them): the log was damaged or edited. The training state does not depend on it.
        """
        if not self.main:
            return None
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, "r+b") as f:
                f.truncate(min(int(metrics_bytes), os.path.getsize(self.metrics_path)))
        with open(self.metrics_path, "ab+") as f:
            f.seek(0)
            self._digest = hashlib.sha256(f.read())
        self._log = open(self.metrics_path, "a", encoding="utf-8")
        if sha256 is not None and self._digest.hexdigest() != sha256:
            return (f"memopt: warning: metrics.jsonl in {self.run_dir} does not match the checksum its checkpoint "
                    "recorded (the log was damaged or edited); training resumes from the checkpoint, whose state "
                    "does not depend on it, and memopt verify reports it.")
        return None

    def digest(self) -> str | None:
        """sha256 of metrics.jsonl so far (None off rank 0): the checkpoint records it."""
        return None if self._log is None else self._digest.hexdigest()

    def record(self, obj: dict) -> None:
        """Append one line to metrics.jsonl and flush it."""
        if self._log is None:
            return
        # Strict JSON has no nan or inf: write those as strings so every reader can parse the file.
        obj = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
        line = json.dumps(obj) + "\n"
        self._log.write(line)
        self._log.flush()
        self._digest.update(line.encode("utf-8"))

    def tell(self) -> int:
        """Bytes of metrics.jsonl so far (0 off rank 0): a checkpoint's place in the log."""
        if self._log is None:
            return 0
        self._log.flush()
        return self._log.tell()

    def save_params(self, params: Any, cfg: ModelConfig, step: int) -> None:
        """params.safetensors in fp16 (fp32 when a value is beyond fp16's range), recording ``step``."""
        if not self.main:
            return
        path = os.path.join(self.run_dir, PARAMS_FILE)
        try:
            save_params(path, params, cfg, dtype=torch.float16, step=step)
        except ValueError:  # a value beyond fp16's range: keep the params whole
            save_params(path, params, cfg, dtype=torch.float32, step=step)

    def write_config(self, config: dict) -> None:
        """Replace config.json (a resumed run whose --steps changed records it)."""
        if self.main:
            _write_json(os.path.join(self.run_dir, "config.json"), config)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
