"""Stop requests: Ctrl-C (SIGINT) and SIGTERM ask the training loop to stop after the current step, on every rank.

SIGTERM is what schedulers, ``docker stop`` and ``kill`` send before they kill: it is handled as
Ctrl-C is, so the run saves a checkpoint and exits with 143 (128 + SIGTERM), where Ctrl-C gives 130.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from ..parallel.process_group import DistInfo, collective, comm_device

__all__ = ["StopRequest", "EXIT_CODES"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report


class StopRequest:
    """The first SIGINT or SIGTERM asks the loop to stop after the current step; a second one aborts.

    Under torchrun every signal only asks: the terminal signals the ranks and torchrun signals
    them again at once (and forwards SIGTERM), and torchrun itself kills ranks that have not exited
    30 s later. The ranks agree on the request after each step (:meth:`agreed`), so they stop at the
    same step and every rank takes part in the checkpoint.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.requested = False
        self.signal: int | None = None  # the first signal received (SIGTERM when another rank's was agreed on)
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and self.info.world_size == 1:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signum

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (one tiny all-reduce per step with several ranks)."""
        if self.info.world_size == 1:
            return self.requested
        # The code carries the signal too: 2 (SIGINT) or 15 (SIGTERM); the ranks agree on the largest.
        flag = torch.tensor([int(self.signal or 0) if self.requested else 0], device=comm_device(None))
        collective("train", "the stop-request all-reduce", dist.all_reduce, flag, op=dist.ReduceOp.MAX)
        code = int(flag)
        self.requested = code > 0
        if self.requested:
            self.signal = signal.Signals(code)
        return self.requested

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return EXIT_CODES.get(self.signal, 130)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
