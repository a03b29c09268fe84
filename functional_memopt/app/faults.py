"""Fault injection for the ``memopt`` command: die, or find the disk full, at a named write phase.

``FUNCTIONAL_MEMOPT_FAULT=<phase>[@<n>][=<action>]`` makes the n-th time (default 1) this process
reaches ``<phase>`` end as ``<action>``:

- ``kill`` (default): SIGKILL to itself, as a power-less crash or the OOM killer would: the disk keeps
  exactly what was written so far, and nothing is cleaned up;
- ``enospc``: the write fails with OSError ENOSPC, as on a full disk;
- ``poison`` (phase ``step:begin`` only): before the n-th training step, one second moment of the
  in-memory optimizer state becomes -1, as a memory fault would leave it: the update of that step
  is then not finite although its gradients are (the loop's recovery is what this exercises).

Phases are ``<kind>:<stage>`` from ``io.files``: kinds ``checkpoint`` (the tensor file),
``state.json``, ``params.safetensors`` and ``config.json``; stages ``begin``, ``written``, ``synced``,
``renamed``; ``checkpoint:committed`` (state.json replaced, older tensor files not yet removed); and
``step:begin`` (the n-th training step of this process, before it runs).
The fault suite (tests/test_faults.py) and benchmarks/fault_campaign.py use it; it is read here,
in the app, and the library only announces its phases.

Example:
    FUNCTIONAL_MEMOPT_FAULT=params.safetensors:written@3 memopt train --steps 30
    FUNCTIONAL_MEMOPT_FAULT=step:begin@4=poison memopt train --steps 30
"""

from __future__ import annotations

import errno
import os
import re
import signal

import torch

from .._tree import tree_flatten_with_paths
from ..io.files import WRITE_STAGES, add_write_hook

__all__ = ["install_fault_hook", "poison_state", "WRITE_PHASES", "FAULT_PHASES", "ACTIONS"]

WRITE_PHASES = tuple(f"{kind}:{stage}" for kind in ("checkpoint", "state.json", "params.safetensors", "config.json")
                     for stage in WRITE_STAGES) + ("checkpoint:committed",)
FAULT_PHASES = WRITE_PHASES + ("step:begin",)
ACTIONS = ("kill", "enospc", "poison")
_STEP_ACTIONS = ("kill", "poison")  # at step:begin, nothing is written, so there is no disk to fill
_SPEC = re.compile(r"^(?P<phase>[\w.\-]+:[a-z]+)(?:@(?P<n>\d+))?(?:=(?P<action>[a-z]+))?$")
_removers: list = []
_step_faults: list = []  # (n, action) of a step:begin spec


def poison_state(state, n: int) -> None:
    """The ``step:begin`` fault, if one is installed for step ``n`` (of this process); nothing otherwise."""
    for at, action in _step_faults:
        if at != n:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        nu = [v for k, v in tree_flatten_with_paths(state.opt_state).items()
              if ".nu" in f".{k}" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
        with torch.no_grad():
            nu[0].fill_(-1.0)


def install_fault_hook(spec: str | None):
    """Install the hook that ``spec`` describes (None or "" installs nothing); returns its remover or None."""
    for remove in _removers:  # one spec per process: a second call replaces the first
        remove()
    _removers.clear()
    if not spec:
        return None
    m = _SPEC.match(spec.strip())
    action = (m["action"] or "kill") if m else None
    step = bool(m) and m["phase"] == "step:begin"
    if (not m or m["phase"] not in FAULT_PHASES or action not in ACTIONS or m["n"] == "0"
            or (action == "poison" and not step) or (step and action not in _STEP_ACTIONS)):
        raise ValueError(
            f"FUNCTIONAL_MEMOPT_FAULT={spec!r} is not <phase>[@<n>][=<action>] with a phase among "
            f"{', '.join(FAULT_PHASES)}, n >= 1 and an action among {', '.join(ACTIONS)} (poison at step:begin "
            "only, enospc at write phases only); unset it to run normally."
        )
    phase, n = m["phase"], int(m["n"] or 1)
    seen = [0]
    if step:
        _step_faults.append((n, action))
        _removers.append(_step_faults.clear)
        return _step_faults.clear

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
