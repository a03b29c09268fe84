"""The process's resident memory: now, its peak, and resetting the peak (Linux /proc, else getrusage).

The one reader of resident memory: the training command's progress, the hygiene wrapper's
statistics and the measurements all use it.
"""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["rss_now", "rss_peak", "reset_rss_peak"]


def rss_now() -> int:
    """Resident bytes now (Linux /proc; elsewhere the peak so far, the best that is portable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return rss_peak()


def reset_rss_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak() -> int:
    """Peak resident bytes: VmHWM (resettable) on Linux, else ru_maxrss (since the process began)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
