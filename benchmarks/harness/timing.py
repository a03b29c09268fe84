"""Interleaved timing: every runner is called once per round, A B C A B C ..., after a warm-up.

Interleaving spreads slow phases of a shared machine (other processes, frequency changes) over
all runners alike, so the ratio of two medians is fairer than two back-to-back series.

Three clocks are kept per call: wall time, and the process's CPU time in user mode and in the
kernel. On a CPU run with one intra-op thread, user time counts only the work this process did,
so it stays steady when other processes compete for the cores (wall time then measures the
scheduler); it is the primary clock there. Kernel time is left out of it on purpose: it is mostly
page faults of freshly mapped heap, which in an interleaved run depend on what the *previous*
runner freed (runners take turns on one heap and fragment it), whereas a single training loop
settles after a few steps and then faults no more. It is recorded as ``sys`` next to the rest.
On CUDA the device is synchronised around each call and wall time is primary.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable

import torch


def make_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def primary_clock(device: torch.device, threads: int) -> str:
    """'user' (process CPU time in user mode) for a single-threaded CPU run, else 'wall'."""
    return "user" if device.type == "cpu" and threads == 1 else "wall"


def _cpu_times() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def interleave(
    runners: dict[str, Callable[[], Any]],
    *,
    warmup: int,
    reps: int,
    device: torch.device,
    clock: str,
    deadline: float | None = None,
) -> dict[str, dict]:
    """Time each runner ``reps`` times, interleaved, after ``warmup`` interleaved calls.

    Args:
        runners: name -> zero-argument callable doing one step (it keeps its own state).
        warmup: untimed rounds first.
        reps: timed rounds (at least 1 always runs, even past the deadline).
        device: synchronised around each timed call.
        clock: "user" or "wall", the clock whose median is reported as ``s``.
        deadline: a ``time.monotonic()`` value after which no further round starts.

    Returns:
        name -> {"s": median of the primary clock, "clock": its name, "wall_s", "user_s", "sys_s":
        medians, "wall", "user", "sys": the samples, "reps": rounds timed}.
    """
    sync = make_sync(device)
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    sync()
    samples = {name: {"wall": [], "user": [], "sys": []} for name in runners}
    for r in range(reps):
        if r > 0 and deadline is not None and time.monotonic() > deadline:
            break
        for name, fn in runners.items():
            sync()
            w0, (u0, s0) = time.perf_counter(), _cpu_times()
            fn()
            sync()
            w1, (u1, s1) = time.perf_counter(), _cpu_times()
            samples[name]["wall"].append(w1 - w0)
            samples[name]["user"].append(u1 - u0)
            samples[name]["sys"].append(s1 - s0)
    out = {}
    for name, s in samples.items():
        med = {k: statistics.median(v) for k, v in s.items()}
        out[name] = {"s": med[clock], "clock": clock, "wall_s": med["wall"], "user_s": med["user"],
                     "sys_s": med["sys"], **s, "reps": len(s["wall"])}
    return out


def ratio(timings: dict[str, dict], a: str, b: str) -> dict:
    """Ratio a / b of the medians, and the median of the per-round ratios (paired)."""
    ta, tb = timings[a], timings[b]
    key = ta["clock"]
    paired = statistics.median([x / y for x, y in zip(ta[key], tb[key]) if y > 0] or [float("nan")])
    return {"ratio": ta["s"] / tb["s"], "paired_ratio": paired}

