"""``torch.compile`` where it pays: the differentiated loss, forward and backward in one graph.

``make_train_step(..., compile=True)`` compiles one function, the policy-wrapped
``scaled_loss(params, batch, factor) -> (loss_sum * factor, (loss_sum, count))``. The autograd
engine calls it on detached aliases of the params that require grad, so AOTAutograd traces the
joint forward and backward and hands ``torch.autograd.grad`` one autograd node whose backward is a
compiled graph. Everything around it stays eager: ``torch.autograd.grad`` itself (dynamo does not
trace it), the fold over micro-batches, the skip decision ``if not bool(finite)`` (a host sync),
and the fused AdamW kernel (whose in-place writes dynamo cannot functionalize).

No recompiles after the first step: ``factor`` (loss scale / global token count) is a float64
tensor input of shape (1,), not a Python float, so its value is never guarded on (a 0-d float64
CPU tensor would be: dynamo takes it for a traced Python float, re-traces once and guards that it
is not nan); the step count never reaches the loss; micro-batches of one shape give one graph
(``dynamic=False`` keeps it specialised).

Each call of :func:`compile_loss` compiles a fresh copy of the function's code object: dynamo keeps
its cache per code object, so without the copy every ``make_train_step`` in a process (each with
its own config closed over) would add entries to one shared cache and, past
``torch._dynamo.config.recompile_limit`` (8), fall back to eager.

Remat works under it: around the compiled call, ``model.remat.remat`` is traced as
``torch.utils.checkpoint`` (the region AOTAutograd's partitioner must recompute), since the
library's own ``_Remat`` function, traced, would have its recompute merged back into the forward.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch

from ..model.remat import torch_checkpoint_when_traced

__all__ = ["COMPILE_DEFAULTS", "compile_options", "compile_loss"]

# fullgraph: a graph break inside the loss is an error at the first step, not a silent split into
# graphs with eager code between them. dynamic=False: one graph per micro-batch shape, no symbolic
# shapes (a ragged last batch compiles a second graph instead of making every dimension dynamic).
COMPILE_DEFAULTS: dict[str, Any] = {"fullgraph": True, "dynamic": False}


def compile_options(compile: bool | dict | None) -> dict | None:
    """The ``torch.compile`` keyword arguments for ``make_train_step(compile=...)``; None: no compile."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return dict(COMPILE_DEFAULTS)
    if isinstance(compile, dict):
        return {**COMPILE_DEFAULTS, **compile}
    raise TypeError(f"make_train_step: compile must be a bool or a dict of torch.compile options, got {compile!r}.")


def _fresh_code(fn: Callable) -> Callable:
    """``fn`` with its own copy of its code object (same closure, globals and defaults)."""
    if not isinstance(fn, types.FunctionType):
        return fn
    code = fn.__code__.replace()
    if code is fn.__code__:  # pragma: no cover - CPython returns a new object
        return fn
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    return copy


def compile_loss(fn: Callable, options: dict) -> Callable:
    """``torch.compile(fn, **options)``, with a dynamo cache of its own (see the module docstring).

    Calls run under :func:`torch_checkpoint_when_traced`, so remat blocks inside ``fn`` are traced as
    ``torch.utils.checkpoint`` and the compiled backward recomputes them (see ``model/remat.py``).
    """
    compiled = torch.compile(_fresh_code(fn), **options)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch_checkpoint_when_traced():
            return compiled(*args, **kwargs)

    return run
