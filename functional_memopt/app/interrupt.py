"""Stop requests: Ctrl-C asks the training loop to stop after the current step, on every rank."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from ..parallel.process_group import DistInfo, collective, comm_device

__all__ = ["StopRequest"]


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step; a second one aborts.

    Under torchrun every Ctrl-C only asks: the terminal signals the ranks and torchrun signals
    them again at once, and torchrun itself kills ranks that have not exited 30 s later. The ranks
    agree on the request after each step (:meth:`agreed`), so they stop at the same step.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested and self.info.world_size == 1:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (one tiny all-reduce per step with several ranks)."""
        if self.info.world_size == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=comm_device(None))
        collective("train", "the stop-request all-reduce", dist.all_reduce, flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag)
        return self.requested

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
