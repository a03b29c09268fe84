"""Fault injection for the ``memopt`` command: die, or find the disk full, at a named write phase.

``FUNCTIONAL_MEMOPT_FAULT=<phase>[@<n>][=<action>]`` makes the n-th time (default 1) this process
reaches ``<phase>`` end as ``<action>``:

- ``kill`` (default): SIGKILL to itself, as a power-less crash or the OOM killer would: the disk keeps
  exactly what was written so far, and nothing is cleaned up;
- ``enospc``: the write fails with OSError ENOSPC, as on a full disk.

Phases are ``<kind>:<stage>`` from ``io.files``: kinds ``checkpoint`` (the tensor file),
``state.json``, ``params.safetensors`` and ``config.json``; stages ``begin``, ``written``, ``synced``,
``renamed``; and ``checkpoint:committed`` (state.json replaced, older tensor files not yet removed).
The fault suite (tests/test_faults.py) and benchmarks/fault_campaign.py use it; it is read here,
in the app, and the library only announces its phases.

Example:
    FUNCTIONAL_MEMOPT_FAULT=params.safetensors:written@3 memopt train --steps 30
"""

from __future__ import annotations

import errno
import os
import re
import signal

from ..io.files import WRITE_STAGES, add_write_hook

__all__ = ["install_fault_hook", "FAULT_PHASES", "ACTIONS"]

FAULT_PHASES = tuple(f"{kind}:{stage}" for kind in ("checkpoint", "state.json", "params.safetensors", "config.json")
                     for stage in WRITE_STAGES) + ("checkpoint:committed",)
ACTIONS = ("kill", "enospc")
_SPEC = re.compile(r"^(?P<phase>[\w.\-]+:[a-z]+)(?:@(?P<n>\d+))?(?:=(?P<action>[a-z]+))?$")
_removers: list = []


def install_fault_hook(spec: str | None):
    """Install the hook that ``spec`` describes (None or "" installs nothing); returns its remover or None."""
    for remove in _removers:  # one spec per process: a second call replaces the first
        remove()
    _removers.clear()
    if not spec:
        return None
    m = _SPEC.match(spec.strip())
    if not m or m["phase"] not in FAULT_PHASES or (m["action"] or "kill") not in ACTIONS or m["n"] == "0":
        raise ValueError(
            f"FUNCTIONAL_MEMOPT_FAULT={spec!r} is not <phase>[@<n>][=<action>] with a phase among "
            f"{', '.join(FAULT_PHASES)}, n >= 1 and an action among {', '.join(ACTIONS)}; unset it to run normally."
        )
    phase, n, action = m["phase"], int(m["n"] or 1), m["action"] or "kill"
    seen = [0]

    def hook(at: str, path: str) -> None:
        if at != phase:
            return
        seen[0] += 1
        if seen[0] != n:
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {phase}): {path!r}")

    remove = add_write_hook(hook)
    _removers.append(remove)
    return remove
