"""Memory hygiene, measured rather than assumed: garbage collection and CUDA cache clearing around a step.

One ``gc.collect()`` costs about 150 ms on the CPU and gives nothing back there, and emptying the
CUDA cache every step slows training (transformers made it opt-in), so the wrapper does nothing
unless asked; its statistics let a run see whether collecting pays.
"""

from __future__ import annotations

import functools
import gc
from typing import Any, Callable

import optree
import torch

from .rss import rss_now

__all__ = ["with_memory_hygiene"]


def _device_of(tree: Any) -> torch.device:
    for leaf in optree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def with_memory_hygiene(step: Callable, *, gc_every: int = 0, empty_cache: bool = True,
                        stats: bool = True) -> Callable:
    """Wrap a train step with garbage collection, cache clearing and memory statistics.

    Every ``gc_every`` calls the wrapper runs ``gc.collect()`` after the step and, on CUDA with
    ``empty_cache``, ``torch.cuda.empty_cache()``. Emptying the cache every step slows training
    (transformers made it opt-in), so it is off unless asked for; for fragmentation the usual fix is
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``. With ``stats`` the metrics gain 0-d
    tensors: ``mem_allocated``, ``mem_reserved`` (bytes) and ``mem_fragmentation``
    ((reserved - allocated) / reserved) on CUDA; ``mem_rss`` (bytes) on the CPU; and ``mem_gc``
    (True on the calls that collected). The step's own metrics are kept; its state is untouched.

    Args:
        step: ``step(state, batch, ...) -> (state, metrics dict)``.
        gc_every: collect every N calls; 0 never collects.
        empty_cache: on the collecting calls, also return cached CUDA blocks to the driver.
        stats: add the memory metrics.

    Returns:
        The wrapped step, with the same signature.

    Example:
        >>> step = with_memory_hygiene(lambda s, b: (s, {"loss": torch.zeros(())}), gc_every=10)
        >>> sorted(step(None, None)[1])
        ['loss', 'mem_gc', 'mem_rss']
    """
    if isinstance(gc_every, bool) or not isinstance(gc_every, int) or gc_every < 0:
        raise ValueError(f"with_memory_hygiene: gc_every must be an integer >= 0 (0 = never), got {gc_every!r}.")
    calls = 0

    @functools.wraps(step)
    def wrapped(state, *args, **kwargs):
        nonlocal calls
        new_state, metrics = step(state, *args, **kwargs)
        calls += 1
        device = _device_of(new_state)
        collect = gc_every > 0 and calls % gc_every == 0
        if collect:
            gc.collect()
            if empty_cache and device.type == "cuda":
                torch.cuda.empty_cache()
        if not stats:
            return new_state, metrics
        extra = {"mem_gc": torch.tensor(collect)}
        if device.type == "cuda":
            allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
            extra["mem_allocated"] = torch.tensor(allocated, dtype=torch.int64)
            extra["mem_reserved"] = torch.tensor(reserved, dtype=torch.int64)
            extra["mem_fragmentation"] = torch.tensor((reserved - allocated) / reserved if reserved else 0.0)
        else:
            extra["mem_rss"] = torch.tensor(rss_now(), dtype=torch.int64)
        return new_state, {**metrics, **extra}

    return wrapped
