"""Measured memory of training steps, the untied-head variant, and the memory-hygiene wrapper.

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

Run a measurement by hand (prints one JSON line)::

    python -m functional_memopt._memory --measure '{"cfg": {...}, "batch_size": 4, "seq_len": 64}'
"""

from __future__ import annotations

import functools
import gc
import json
import os
import resource
import subprocess
import sys
import weakref
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ._config import ModelConfig
from ._data import load_corpus, sample_batch
from ._ledger import MemorySettings
from ._loss_scale import dynamic_loss_scale
from ._model import final_features, init_params, token_loss
from ._optim import adamw
from ._precision import get_policy
from ._remat import remat_layers
from ._train import init_train_state, make_train_step

__all__ = ["MemoryMeasurement", "TensorMemoryTracker", "measure_memory", "untied_params", "untied_loss_fn",
           "with_memory_hygiene", "add_memory_arguments", "memory_command", "METHODS"]

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
                           donate=s.donate)
    return state, step


def _rss_now() -> int:
    """Resident bytes now (Linux /proc; elsewhere the peak so far, the best that is portable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rss_peak()


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int:
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
    _reset_rss_peak()  # so that an import-time peak cannot hide the steps' peak
    base = _rss_now()
    state, step = _build(cfg, s, device)
    for batch in batches:
        state, _ = step(state, batch)
    if device == "cuda":
        torch.cuda.synchronize()
        out["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
        return out
    out["rss_bytes"] = max(0, _rss_peak() - base)
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "functional_memopt._memory", "--measure", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measure_memory: the measuring subprocess failed ({tail}).")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = got["rss_bytes"] if method == "rss" else got["tensor_bytes"]
    return MemoryMeasurement(peak, method, got["tensor_bytes"], got["rss_bytes"], None)


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
            extra["mem_rss"] = torch.tensor(_rss_now(), dtype=torch.int64)
        return new_state, {**metrics, **extra}

    return wrapped


def add_memory_arguments(parser) -> None:
    """Add the ``memopt memory`` options to an argparse parser (see functional_memopt._memory_cli)."""
    from ._memory_cli import add_memory_arguments as add

    add(parser)


def memory_command(args) -> int:
    """Run ``memopt memory`` for parsed ``args``; returns the exit code."""
    from ._memory_cli import memory_command as run

    return run(args)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Measure one training configuration's peak memory.")
    parser.add_argument("--measure", required=True, help="a JSON spec: cfg, batch_size, seq_len, settings, steps")
    print(json.dumps(_measure_here(json.loads(parser.parse_args().measure))), flush=True)
