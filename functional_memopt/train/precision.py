"""Precision policies: which dtype params are stored in, computed in, and returned in.

A :class:`Policy` names three dtypes; :func:`with_policy` turns a function of params into one that
runs at the policy's compute precision. The default route is an explicit cast (as DeepMind's jmp
does): params are cast to the compute dtype *inside* the differentiated function, so
``torch.func.grad`` carries the gradient back through ``.to()`` and returns it in the params' own
dtype (float32 for float32 master params). The alternative route runs the function under
``torch.autocast``, which lowers only the ops on autocast's list (matmuls, linear, attention).

On ``torch.autocast`` under ``torch.func.grad``: autocast's rules are written for forward ops only;
backward ops are never autocast (functorch issue 305). Backward ops still run in the dtype of the
forward tensors they consume, so on torch 2.13 (CPU) the gradients of an autocast function under
``torch.func.grad`` are bit-identical to those of the imperative recipe (autocast forward,
``backward`` outside it) and to an explicit cast of the same ops. This held with autocast entered
inside the transform and around it (a small MLP, bf16 and fp16); tests/test_precision.py holds
it for the model with autocast inside, as :func:`with_policy` enters it.

Why "cast" is the default: it does the same thing on every device and under every transform (the
ops autocast lowers differ between CPU and CUDA, and autocast is thread-local state that a
transform or a compiled region must carry), it keeps the residual stream in the compute dtype
(19 MiB of tensors saved for backward vs 22 MiB under autocast and 37 MiB in fp32 on the tiny preset,
batch 8 x 128), and it costs the same time. Autocast keeps layer norms and the residual adds in
float32 and is a little more accurate (gradient error 0.73 vs 1.02 eps on that model), well
within the tolerances of ``functional_memopt.testing`` either way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from .._dtypes import DTYPES as _DTYPES
from .._dtypes import dtype_name
from .._tree import tree_cast, tree_leaves

__all__ = ["Policy", "get_policy", "with_policy"]

PyTree = Any

_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SHORT_FORMS: dict[str, tuple[torch.dtype, torch.dtype, torch.dtype]] = {
    "fp32": (_F32, _F32, _F32),
    "bf16": (_BF16, _BF16, _BF16),
    "fp16": (_F16, _F16, _F16),
    "mixed_fp16": (_F32, _F16, _F32),
    "mixed_bf16": (_F32, _BF16, _F32),
}
_KEYS = {"params": "param_dtype", "param": "param_dtype", "p": "param_dtype",
         "compute": "compute_dtype", "c": "compute_dtype", "output": "output_dtype", "o": "output_dtype"}

@dataclasses.dataclass(frozen=True)
class Policy:
    """The dtypes of params at rest, of the computation, and of the outputs.

    A frozen dataclass, not a NamedTuple, so that optree treats a policy as one opaque value and
    never flattens its dtypes into a tree of tensors.

    Example:
        >>> p = Policy(torch.float32, torch.bfloat16, torch.float32)
        >>> str(p)
        'params=float32,compute=bfloat16,output=float32'
    """

    param_dtype: torch.dtype  # dtype the (master) params are stored and updated in
    compute_dtype: torch.dtype  # dtype the forward and backward ops run in
    output_dtype: torch.dtype  # dtype of the function's floating outputs (the loss)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value not in _FLOATS:
                raise TypeError(
                    f"Policy: {field.name} must be one of {[dtype_name(d) for d in _FLOATS]} as a torch.dtype, "
                    f"got {value!r}; pass e.g. {field.name}=torch.float32."
                )

    def cast_to_param(self, tree: PyTree) -> PyTree:
        """Floating leaves of ``tree`` cast to ``param_dtype``; other leaves untouched."""
        return tree_cast(tree, self.param_dtype)

    def cast_to_compute(self, tree: PyTree) -> PyTree:
        """Floating leaves of ``tree`` cast to ``compute_dtype``; other leaves untouched."""
        return tree_cast(tree, self.compute_dtype)

    def cast_to_output(self, tree: PyTree) -> PyTree:
        """Floating leaves of ``tree`` cast to ``output_dtype``; other leaves untouched."""
        return tree_cast(tree, self.output_dtype)

    def __str__(self) -> str:
        return (
            f"params={dtype_name(self.param_dtype)},compute={dtype_name(self.compute_dtype)},"
            f"output={dtype_name(self.output_dtype)}"
        )


def _expected(spec) -> str:
    return (
        f"expected a Policy, a short form (one of {sorted(_SHORT_FORMS)}), a dtype name (one of "
        f"{sorted(_DTYPES)}) or 'params=<dtype>,compute=<dtype>,output=<dtype>' in any order, got {spec!r}"
    )


def get_policy(spec: Policy | str) -> Policy:
    """Parse a policy from its string form; a Policy is returned as is.

    Accepted strings (case and spaces ignored): a short form ``fp32``, ``bf16``, ``fp16``,
    ``mixed_fp16`` (params fp32, compute fp16, output fp32) or ``mixed_bf16``; a single dtype name
    for all three; or ``params=float32,compute=bfloat16,output=float32`` (keys in any order, also
    ``p``/``c``/``o``; a key left out means float32). Dtype names: float32/fp32/f32,
    float16/fp16/f16/half, bfloat16/bf16, float64/fp64/f64.

    Args:
        spec: a Policy or a string as above.

    Returns:
        The Policy.

    Example:
        >>> get_policy("mixed_bf16") == get_policy("compute=bf16,params=fp32,output=f32")
        True
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"get_policy: {_expected(spec)} (of type {type(spec).__name__}).")
    text = spec.replace(" ", "").lower()
    if text in _SHORT_FORMS:
        return Policy(*_SHORT_FORMS[text])
    if text in _DTYPES:
        return Policy(*(_DTYPES[text],) * 3)
    if "=" not in text:
        raise ValueError(f"get_policy: {_expected(spec)}.")
    chosen: dict[str, torch.dtype] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in _KEYS or value not in _DTYPES:
            raise ValueError(f"get_policy: cannot read {part!r}; {_expected(spec)}.")
        if _KEYS[key] in chosen:
            raise ValueError(f"get_policy: {key!r} given twice; {_expected(spec)}.")
        chosen[_KEYS[key]] = _DTYPES[value]
    names = ("param_dtype", "compute_dtype", "output_dtype")
    return Policy(**{name: chosen.get(name, torch.float32) for name in names})


def _device_type(params: PyTree) -> str:
    for leaf in tree_leaves(params):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.device.type
    return "cpu"


def with_policy(
    fn: Callable[..., Any],
    policy: Policy | str,
    *,
    mode: str = "cast",
    cast_inputs: bool = True,
    cast_params: bool = True,
    device_type: str | None = None,
) -> Callable[..., Any]:
    """``fn(params, *args, **kwargs)`` run at the policy's compute precision.

    mode="cast": params, and with ``cast_inputs`` the floating tensors among ``args`` and
    ``kwargs`` too, are cast to ``compute_dtype`` and ``fn`` runs on them, so every op computes in
    that dtype (integer tokens and non-tensor arguments pass through). A 0/1 loss mask survives the
    cast exactly; pass ``cast_inputs=False`` for float inputs that must keep their precision.
    mode="autocast": params are kept at ``param_dtype`` and ``fn`` runs under
    ``torch.autocast(device_type, dtype=compute_dtype)``, which lowers only autocast's listed ops
    and keeps e.g. layer norm in float32; a float32 or float64 compute dtype disables autocast.
    In both modes the floating outputs are cast to ``output_dtype``. Gradients with respect to
    ``params`` come back in the params' own dtype, because the cast happens inside the function.

    Args:
        fn: a function whose first argument is the params pytree; it returns a tensor or a pytree
            of tensors (e.g. ``(loss_sum, count)``).
        policy: a Policy or a string for :func:`get_policy`.
        mode: "cast" or "autocast".
        cast_inputs: in cast mode, also cast floating tensors in ``args`` and ``kwargs``.
        cast_params: in cast mode, cast the params before calling ``fn``. Pass False when ``fn``
            casts them itself, just in time (the model's loss with ``compute_dtype``): the
            gradients are the same, and only one block's compute copy is alive at a time.
        device_type: for autocast; by default the device type of the first floating param.

    Returns:
        The wrapped function, with the same signature.

    Example:
        >>> f = with_policy(lambda p, x: (p["w"] * x).sum(), "mixed_bf16")
        >>> torch.func.grad(f)({"w": torch.ones(3)}, torch.ones(3))["w"].dtype
        torch.float32
    """
    policy = get_policy(policy)
    if mode not in ("cast", "autocast"):
        raise ValueError(f"with_policy: mode must be 'cast' or 'autocast', got {mode!r}.")
    lowered = policy.compute_dtype in (torch.float16, torch.bfloat16)

    @functools.wraps(fn)
    def wrapped(params, *args, **kwargs):
        if mode == "cast":
            if cast_inputs:
                args, kwargs = policy.cast_to_compute((args, kwargs))
            out = fn(policy.cast_to_compute(params) if cast_params else params, *args, **kwargs)
        else:
            params = policy.cast_to_param(params)
            kind = device_type or _device_type(params)
            with torch.autocast(device_type=kind, dtype=policy.compute_dtype, enabled=lowered):
                out = fn(params, *args, **kwargs)
        return policy.cast_to_output(out)

    return wrapped
