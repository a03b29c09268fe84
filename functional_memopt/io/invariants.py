"""What a loaded training state must satisfy beyond finite values, checked before it is used.

A state that passes its checksum may still be wrong (a file of an earlier version, edited by hand,
or damaged before it was sealed), and some wrong values are finite: a negative Adam second moment
turns into NaN only at the next update's square root, and a count that differs from ``step``
silently moves the learning-rate schedule (it reads the optimizer's count). Checked here:

- ``step`` (a TrainState's) is >= 0;
- every optimizer count (AdamW's, SGD's) equals ``step``: both advance on applied updates only;
- AdamW's second moments are >= 0;
- a dynamic loss scale is > 0, its counter in [0, growth_interval), growth factor > 1, backoff in
  (0, 1) and floor >= 0; a static one is > 0.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from ..optim.adamw import ScaleByAdamState
from ..optim.sgd import SgdState

__all__ = ["check_state"]


def _int(t: Any) -> int | None:
    return int(t) if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point() else None


def _loss_scale_problems(ls: Any) -> list[str]:
    fields = getattr(ls, "_fields", ())
    value = lambda name: float(getattr(ls, name))  # noqa: E731
    out = []
    if "loss_scale" in fields and not value("loss_scale") > 0:
        out.append(f"loss_scale.loss_scale is {value('loss_scale')}, expected > 0")
    if {"counter", "growth_interval"} <= set(fields):
        counter, interval = int(ls.counter), int(ls.growth_interval)
        if interval < 1:
            out.append(f"loss_scale.growth_interval is {interval}, expected >= 1")
        elif not 0 <= counter < interval:
            out.append(f"loss_scale.counter is {counter}, expected in [0, growth_interval={interval})")
    if "growth_factor" in fields and not value("growth_factor") > 1:
        out.append(f"loss_scale.growth_factor is {value('growth_factor')}, expected > 1")
    if "backoff_factor" in fields and not 0 < value("backoff_factor") < 1:
        out.append(f"loss_scale.backoff_factor is {value('backoff_factor')}, expected in (0, 1)")
    if "min_loss_scale" in fields and not value("min_loss_scale") >= 0:
        out.append(f"loss_scale.min_loss_scale is {value('min_loss_scale')}, expected >= 0")
    return out


def check_state(state: Any, *, caller: str, source: str) -> None:
    """Raise ValueError listing every invariant of ``state`` (a TrainState, or any pytree) that fails.

    Args:
        state: the loaded state; trees without a ``step``, optimizer states or a loss scale are
            checked for what they have.
        caller, source: the start of the message and what was loaded (e.g. "the checkpoint in 'runs/a'").
    """
    problems = []
    step = _int(getattr(state, "step", None))
    if step is not None and step < 0:
        problems.append(f"step is {step}, expected >= 0")
    opt_state = getattr(state, "opt_state", state)
    found = optree.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, (ScaleByAdamState, SgdState)),
                               none_is_leaf=False)
    for i, s in enumerate(x for x in found if isinstance(x, (ScaleByAdamState, SgdState))):
        name = f"{type(s).__name__} {i}" if len(found) > 1 else type(s).__name__
        count = _int(s.count)
        if count is None or count < 0 or (step is not None and count != step):
            want = f"equal to step ({step}): both count applied updates" if step is not None else ">= 0"
            problems.append(f"the optimizer count of {name} is {count}, expected {want}")
        if isinstance(s, ScaleByAdamState):
            nu = [x for x in optree.tree_leaves(s.nu) if x.numel()]
            if nu:
                lows = torch.stack([x.detach().min().double() for x in nu]).cpu()
                if bool((lows < 0).any()):
                    problems.append(f"AdamW's second moments hold negative values (down to {float(lows.min()):.4g}), "
                                    "expected >= 0")
    problems += _loss_scale_problems(getattr(state, "loss_scale", None))
    if problems:
        raise ValueError(f"{caller}: {source} breaks the invariants of a training state: {'; '.join(problems)}. "
                         "It was not produced by a training step as it is (damaged or edited); restore it from a "
                         "good copy or start a new run.")
