"""Measured memory of training steps, and the untied-head variant the ledger's baseline needs.

Three measures, each of one configuration's steps:

* ``tensors`` (the CPU default): the exact peak of live tensor bytes, from a ``TorchDispatchMode``
  that sees every op (forward, backward, optimizer) and a weak reference on each new storage that
  subtracts its bytes when it is freed. It counts what the ledger predicts and nothing else, so it
  is deterministic and independent of the malloc arenas, the thread pools and the kernels' scratch.
  ``torch.profiler(profile_memory=True)`` was tried first: it reports per-op self memory, its
  running sum does not reconstruct the live total, and it ran ~6x slower.
* ``rss``: the process's peak resident memory (``ru_maxrss``) minus its resident memory after the
  imports, in a fresh subprocess per configuration: what the machine actually paid, allocator
  slack, runtime buffers and all.
* ``cuda``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, in process.

On the CPU each measurement runs in a fresh interpreter (``python -m functional_memopt.memory.measure
SPEC``), which answers its parent with one JSON line on stdout: a protocol between two processes of
this module, not output for a person.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..data.batch import sample_batch
from ..data.corpus import load_corpus
from ..model.config import ModelConfig
from ..model.gpt import final_features, token_loss
from ..model.layout import init_params
from ..model.remat import remat_layers
from ..optim.adamw import adamw
from ..train.loss_scale import dynamic_loss_scale
from ..train.precision import get_policy
from ..train.step import init_train_state, make_train_step
from .ledger import MemorySettings
from .rss import reset_rss_peak, rss_now, rss_peak

__all__ = ["MemoryMeasurement", "TensorMemoryTracker", "measure_memory", "untied_params", "untied_loss_fn", "METHODS"]

METHODS = ("auto", "tensors", "rss", "cuda")


class MemoryMeasurement(NamedTuple):
    """Measured bytes of a few training steps of one configuration."""

    peak_bytes: int  # the chosen method's figure
    method: str  # "tensors", "rss" or "cuda"
    tensor_bytes: int | None  # peak live tensor bytes (state and batch included), CPU runs
    rss_bytes: int | None  # peak resident memory above the post-import baseline, CPU runs
    cuda_bytes: int | None  # torch.cuda.max_memory_allocated over the steps, CUDA runs


class TensorMemoryTracker(TorchDispatchMode):
    """Context manager: the peak of live tensor bytes over the ops run inside it.

    Tensors made before entering are invisible unless passed to :meth:`track` (e.g. the train state
    and the batch). Storages are counted once, however many views share them.

    Example:
        >>> tracker = TensorMemoryTracker()
        >>> with tracker:
        ...     y = torch.ones(1024) * 2
        >>> tracker.peak
        8192
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0  # bytes of tracked storages still alive
        self.peak = 0  # the most ``live`` has been
        self._alive: dict[int, weakref.ref] = {}  # storage data_ptr -> weak ref to the storage

    def _freed(self, key: int, nbytes: int, ref: weakref.ref) -> None:
        if self._alive.get(key) is ref:
            del self._alive[key]
            self.live -= nbytes

    def track(self, tree: Any) -> "TensorMemoryTracker":
        """Count the tensor leaves of ``tree`` as live (those already counted are skipped)."""
        for t in optree.tree_leaves(tree):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key in self._alive and self._alive[key]() is not None):
                continue
            nbytes = storage.nbytes()
            ref = weakref.ref(storage, lambda r, k=key, n=nbytes: self._freed(k, n, r))
            self._alive[key] = ref
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


def untied_params(params: dict) -> dict:
    """``params`` plus a separate ``lm_head`` (V, C) leaf, a copy of ``wte``, for :func:`untied_loss_fn`."""
    return {**params, "lm_head": params["wte"].clone()}


def untied_loss_fn(cfg: ModelConfig, *, remat: Any = None) -> Callable:
    """``loss(params, batch) -> (loss_sum, count)`` of the model with an untied output head.

    The library always ties the head to ``wte``; this variant reads ``params["lm_head"]`` instead
    (see :func:`untied_params`) so that the memory of an untied model can be measured. It is the
    model's own loss otherwise: same blocks, same float32 cross-entropy.

    Example:
        >>> from functional_memopt import init_params, sample_batch, load_corpus
        >>> cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2)
        >>> batch = sample_batch(load_corpus(), 2, 8, seed=0, index=0)
        >>> loss_sum, count = untied_loss_fn(cfg)(untied_params(init_params(cfg)), batch)
    """
    def loss(params, batch):
        x = final_features(params, batch.tokens, cfg, attention_mask=batch.attention_mask,
                           segment_ids=batch.segment_ids, remat=remat)
        return token_loss(F.linear(x, params["lm_head"]), batch.targets, batch.mask)  # (B, T, V) logits

    return loss


def _build(cfg: ModelConfig, s: MemorySettings, device: str):
    """The train state and step that ``s`` describes (AdamW, as the ledger assumes)."""
    params = init_params(cfg, seed=0, device=device)
    if not s.tied:
        params = untied_params(params)
    pol = get_policy(s.policy)
    scale = dynamic_loss_scale(device=device) if pol.compute_dtype == torch.float16 else None
    opt = adamw(3e-4)
    state = init_train_state(params, opt, loss_scale=scale, policy=pol)
    loss = None if s.tied else untied_loss_fn(cfg, remat=s.remat)
    step = make_train_step(cfg, opt, policy=pol, accum_steps=s.accum_steps, remat=s.remat, loss_fn=loss,
                           donate=s.donate, loss_chunk=s.loss_chunk)
    return state, step


def _batches(batch_size: int, seq_len: int, steps: int, device: str) -> list:
    data = load_corpus()
    return [sample_batch(data, batch_size, seq_len, seed=0, index=i, device=device) for i in range(steps)]


def _measure_here(spec: dict) -> dict:
    """One configuration, in this process: returns {"tensor_bytes", "rss_bytes", "cuda_bytes"}."""
    cfg = ModelConfig.from_dict(spec["cfg"])
    s = MemorySettings(**spec.get("settings", {}))
    device, steps = spec.get("device", "cpu"), int(spec.get("steps", 3))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    batches = _batches(spec["batch_size"], spec["seq_len"], steps, device)
    out = {"tensor_bytes": None, "rss_bytes": None, "cuda_bytes": None}
    # A step of a minute model on the same code paths first: torch.func and the kernels import and
    # initialise lazily (~70 MB of RSS for the remat path), which is not the configuration's memory.
    tiny = ModelConfig(vocab_size=cfg.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8)
    warm = s._replace(remat="all" if remat_layers(s.remat, cfg.n_layer) else None)
    state, step = _build(tiny, warm, device)
    step(state, sample_batch(load_corpus(), s.accum_steps, 8, seed=0, index=0, device=device))
    del state, step
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_rss_peak()  # so that an import-time peak cannot hide the steps' peak
    base = rss_now()
    state, step = _build(cfg, s, device)
    for batch in batches:
        state, _ = step(state, batch)
    if device == "cuda":
        torch.cuda.synchronize()
        out["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
        return out
    out["rss_bytes"] = max(0, rss_peak() - base)
    tracker = TensorMemoryTracker().track((state, batches[0]))
    with tracker:  # one more step, after the RSS is read: the tracker's bookkeeping stays out of it
        state, _ = step(state, batches[0])
    out["tensor_bytes"] = tracker.peak
    return out


def measure_memory(cfg: ModelConfig, *, batch_size: int, seq_len: int, settings: MemorySettings | None = None,
                   steps: int = 3, device: str = "cpu", method: str = "auto", timeout: float = 600.0
                   ) -> MemoryMeasurement:
    """Run ``steps`` real training steps of one configuration and measure their peak memory.

    On the CPU a fresh subprocess runs the steps (so one configuration's allocator state cannot
    leak into the next) and reports both the RSS and the tensor peak; on CUDA the steps run here.

    Args:
        cfg, batch_size, seq_len: the model and batch, as for :func:`predict_memory`.
        settings: the techniques (:class:`MemorySettings`); ZeRO cannot be measured in one process.
        steps: training steps to run; the peak over all of them is reported.
        device: "cpu" or "cuda".
        method: "auto" (cuda on CUDA, tensors on the CPU), "tensors", "rss" or "cuda".
        timeout: seconds the subprocess may take.

    Returns:
        A :class:`MemoryMeasurement`.
    """
    s = settings or MemorySettings()
    if method not in METHODS:
        raise ValueError(f"measure_memory: method must be one of {METHODS}, got {method!r}.")
    if method == "auto":
        method = "cuda" if device == "cuda" else "tensors"
    if (method == "cuda") != (device == "cuda"):
        raise ValueError(f"measure_memory: method {method!r} does not measure device {device!r}: 'cuda' is "
                         "for CUDA, 'tensors' and 'rss' for the CPU; or pass method='auto'.")
    if s.zero_stage > 0 and s.world_size > 1:
        raise ValueError("measure_memory: ZeRO sharding needs world_size processes; measure it under the "
                         "distributed launcher, or predict it with predict_memory.")
    spec = {"cfg": cfg.to_dict(), "batch_size": batch_size, "seq_len": seq_len, "settings": s._asdict(),
            "steps": steps, "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        got = _measure_here(spec)
        return MemoryMeasurement(got["cuda_bytes"], "cuda", None, None, got["cuda_bytes"])
    # The child imports this very package: run it from the folder that holds it.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True,
                          cwd=root, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measure_memory: the measuring subprocess failed ({tail}).")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = got["rss_bytes"] if method == "rss" else got["tensor_bytes"]
    return MemoryMeasurement(peak, method, got["tensor_bytes"], got["rss_bytes"], None)


if __name__ == "__main__":  # the measuring child of measure_memory: one spec in, one JSON line out
    sys.stdout.write(json.dumps(_measure_here(json.loads(sys.argv[1]))) + "\n")
