"""Run one benchmark task in a fresh Python process and read back its JSON result.

A fresh process gives a clean memory high-water mark, its own allocator settings (environment
variables are read at start-up) and isolation: a crash, a hang past the timeout, or an error in
the task is recorded as an error in the results instead of ending the benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MARKER = "@@benchmark-result@@ "
RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.py")
REPO = os.path.dirname(os.path.dirname(RUN_PY))


def emit(result: dict) -> None:
    """Print the task's result where :func:`spawn` finds it (the last marked line of stdout)."""
    print(MARKER + json.dumps(result), flush=True)


def _last_result(stdout) -> dict | None:
    if isinstance(stdout, bytes):
        stdout = stdout.decode("utf-8", "replace")
    lines = [ln for ln in (stdout or "").splitlines() if ln.startswith(MARKER)]
    return json.loads(lines[-1][len(MARKER):]) if lines else None


def spawn(task: str, spec: dict, *, timeout: float, env: dict | None = None, unset: tuple = ()) -> dict:
    """Run ``run.py --worker task`` with ``spec``; its result dict, or {"error": ...}.

    Args:
        task: the worker's name (see run.py's WORKERS).
        spec: JSON-ready arguments of the task.
        timeout: seconds before the process is killed.
        env: extra environment variables for the process.
        unset: environment variables to remove for the process.
    """
    full = dict(os.environ)
    for key in unset:
        full.pop(key, None)
    full.update(env or {})
    # The package is importable from the repository root whether or not it is installed.
    full["PYTHONPATH"] = REPO + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
    cmd = [sys.executable, RUN_PY, "--worker", task, "--spec", json.dumps(spec)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), env=full)
    except subprocess.TimeoutExpired as err:
        partial = _last_result(err.stdout)
        note = f"timed out after {timeout:.0f} s"
        if partial is None:
            return {"error": note, "seconds": time.monotonic() - t0}
        partial.setdefault("errors", {})["timeout"] = note + "; the results are those of the stages finished"
        partial["seconds"] = time.monotonic() - t0
        return partial
    seconds = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        return {"error": f"exit code {proc.returncode}", "stderr_tail": tail, "seconds": seconds}
    result = json.loads(lines[-1][len(MARKER):])
    result.setdefault("seconds", seconds)
    return result
