"""The training loop behind ``memopt train``: a run directory, progress, evaluation, checkpoints.

A run directory holds ``config.json`` (model config, every training argument, and what "auto"
resolved to), ``metrics.jsonl`` (one JSON object per step and per evaluation), a resumable
checkpoint (``state.json`` + tensors, see ``_checkpoint``) and ``params.safetensors`` (the
checkpoint's params in fp16). A checkpoint is written at the start, every ``eval_interval`` steps,
at the end and on Ctrl-C; batches are a function of (seed, index), so a resumed run takes exactly
the steps an unbroken run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

import torch

from ._checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from ._config import ModelConfig
from ._data import load_corpus, sample_batch, train_val_split
from ._loss_scale import dynamic_loss_scale, no_op_loss_scale, static_loss_scale
from ._model import init_params
from ._optim import adamw, decay_mask
from ._precision import get_policy, with_policy
from ._schedules import linear_warmup, warmup_cosine
from ._storage import atomic_write, save_params
from ._train import init_train_state, make_loss_fn, make_train_step
from ._version import __version__

try:  # POSIX only; elsewhere the CPU peak is reported as 0
    import resource
except ImportError:  # pragma: no cover
    resource = None

__all__ = ["TrainArgs", "Resolved", "TrainResult", "train", "RUN_FORMAT", "read_run_config", "VAL_SEED"]

RUN_FORMAT = "functional_memopt.run"
VAL_SEED = 1234  # validation batches do not depend on --seed, so runs with different seeds compare
_RUN_FILES = ("config.json", "metrics.jsonl", "params.safetensors", "state.json")


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Every argument of ``memopt train`` that shapes a run, as recorded in config.json."""

    preset: str = "tiny"  # a name from PRESETS
    n_layer: int | None = None  # overrides of the preset's shape (None: keep the preset's)
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    policy: str = "auto"  # precision policy string, or "auto" (best for the device)
    loss_scale: str = "auto"  # "auto" (dynamic for fp16 compute), "none", "dynamic" or a number
    batch_size: int = 32  # rows per optimizer step
    accum_steps: int | None = None  # micro-batches per step (None: 4, or the most of 4, 2, 1 that divides)
    seq_len: int | None = None  # tokens per row (None: block_size)
    remat: str = "none"  # "none", "all" or N (every N-th block)
    lr: float = 2e-3  # peak learning rate
    min_lr: float | None = None  # final learning rate of the cosine schedule (None: lr / 10)
    warmup_steps: int | None = None  # linear warmup steps (None: steps // 8, at most 100)
    schedule: str = "cosine"  # "cosine" or "constant" (after the warmup)
    weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    max_grad_norm: float = 1.0  # global-norm clipping (0: off)
    steps: int = 180  # optimizer steps (batches) in the whole run
    stop_at: int | None = None  # stop (with a checkpoint) at this step; the schedule still spans `steps`
    eval_interval: int | None = None  # steps between evaluations and checkpoints (None: steps // 6)
    eval_batches: int = 8  # validation batches of batch_size // accum_steps rows
    corpus: str | None = None  # a text file or folder (None: the built-in corpus)
    seed: int = 0  # init and batch order
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    threads: str = "auto"  # CPU threads: "auto" (the cores not busy now) or a number
    gc_every: int = 0  # memory hygiene every N steps (0: off)


class Resolved(NamedTuple):
    """What the "auto" arguments resolved to; stored in config.json and reused on resume."""

    policy: str
    loss_scale: str
    accum_steps: int
    seq_len: int
    warmup_steps: int
    eval_interval: int
    threads: int


class TrainResult(NamedTuple):
    """How a run ended."""

    status: str  # "done", "stopped" (at stop_at), "interrupted" (Ctrl-C) or "diverged"
    step: int  # batches consumed
    val_bpb_start: float | None  # validation bits per byte of the run's first evaluation
    val_bpb: float | None  # ... of its last evaluation
    seconds: float  # wall time of this session
    tokens_per_s: float  # counted tokens per second of training steps in this session
    peak_bytes: int  # CUDA max_memory_allocated, or the process's peak RSS on the CPU
    run_dir: str
    message: str  # the summary line


def read_run_config(run_dir: str) -> dict:
    """The parsed config.json of a run directory; ValueError when it is not one."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"train: no run directory at {run_dir!r}; check the path.")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"train: {run_dir!r} is not a memopt run directory (it has no config.json).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"train: {path!r} is not valid JSON ({err}); the run directory is damaged.") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise ValueError(f"train: {path!r} is not a memopt run config (no format {RUN_FORMAT!r}).")
    return record


def _prepare_run_dir(run_dir: str, *, force: bool, dry_run: bool = False) -> None:
    """Check that ``run_dir`` may hold a new run; unless ``dry_run``, clear a previous run and create it."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"train: the run directory {run_dir!r} is a file; choose another --run-dir.")
    entries = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    if entries and not force:
        raise ValueError(
            f"train: the run directory {run_dir!r} already exists and is not empty; pass --force to "
            f"replace that run, --resume {run_dir} to continue it, or choose another --run-dir."
        )
    if entries:
        ours = set(_RUN_FILES) | {e for e in entries if e.startswith("state-") and e.endswith(".safetensors")}
        if "config.json" not in entries or set(entries) - ours - {e for e in entries if e.startswith(".")}:
            raise ValueError(
                f"train: {run_dir!r} holds files that are not a memopt run ({sorted(set(entries) - ours)[:5]}); "
                "--force only replaces a previous run. Choose another --run-dir."
            )
        read_run_config(run_dir)
        if dry_run:
            return
        for name in entries:
            if name in ours:
                os.unlink(os.path.join(run_dir, name))
    if not dry_run:
        os.makedirs(run_dir, exist_ok=True)


def _write_json(path: str, record: dict) -> None:
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, caller="train")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _optimizer(args: TrainArgs, warmup: int):
    final = args.lr / 10 if args.min_lr is None else args.min_lr
    if args.schedule == "cosine":
        sched = warmup_cosine(args.lr, warmup, args.steps, final=final)
    else:
        sched = linear_warmup(args.lr, warmup)
    opt = adamw(sched, b1=args.beta1, b2=args.beta2, weight_decay=args.weight_decay, mask=decay_mask)
    return opt, sched


def _loss_scale(spec: str, device: torch.device):
    if spec == "none":
        return no_op_loss_scale()
    if spec == "dynamic":
        return dynamic_loss_scale(device=device)
    return static_loss_scale(float(spec), device=device)


def _remat(spec: str):
    return None if spec == "none" else ("all" if spec == "all" else int(spec))


class _CtrlC:
    """The first Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _hygiene(step, every: int, device: torch.device):
    """Memory hygiene every ``every`` steps: the _memory wrapper when present, else gc + cache clearing."""
    if every <= 0:
        return step
    try:
        from ._memory import with_hygiene  # type: ignore[attr-defined]

        return with_hygiene(step, every=every)
    except ImportError:
        import gc

        calls = [0]

        def wrapped(state, batch):
            out = step(state, batch)
            calls[0] += 1
            if calls[0] % every == 0:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            return out

        return wrapped


def evaluate(params: Any, cfg: ModelConfig, policy, batches: list) -> float:
    """Mean validation loss in nats per counted token, under the policy's compute precision."""
    loss = with_policy(make_loss_fn(cfg), policy)
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            s, c = loss(params, b)
            total += s.double().cpu()
            count += c.double().cpu()
    return float(total / count.clamp(min=1))


def train(
    args: TrainArgs, cfg: ModelConfig, resolved: Resolved, run_dir: str, device: torch.device,
    *, resume: bool = False, force: bool = False, quiet: bool = False,
) -> TrainResult:
    """Run (or resume) training into ``run_dir``; see the module docstring for what it writes.

    Args:
        args: the run's arguments; cfg: the model; resolved: the "auto" choices, already made.
        run_dir: the run directory (created; refused when it holds files, unless ``force``).
        device: where to train.
        resume: continue the checkpoint in ``run_dir`` (config.json is not rewritten).
        force: replace a previous run in ``run_dir``.
        quiet: no progress bar.

    Returns:
        A TrainResult; progress goes to stderr, and nothing is printed to stdout.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    if not resume:
        _prepare_run_dir(run_dir, force=force, dry_run=True)  # refuse early, before the corpus is read
    policy = get_policy(resolved.policy)
    micro = args.batch_size // resolved.accum_steps
    train_data, val_data = train_val_split(load_corpus(args.corpus))
    T = resolved.seq_len
    for name, part in (("training", train_data), ("validation", val_data)):
        if len(part) <= T:
            raise ValueError(
                f"train: the corpus's {name} part holds {len(part)} bytes, too few for sequences of "
                f"{T}; use a longer --corpus or a shorter --seq-len."
            )
    opt, sched = _optimizer(args, resolved.warmup_steps)
    ls = _loss_scale(resolved.loss_scale, device)
    state = init_train_state(init_params(cfg, seed=args.seed, device=device), opt, loss_scale=ls, policy=policy)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if resume:
        if not has_checkpoint(run_dir):
            raise ValueError(f"train: {run_dir!r} holds no checkpoint to resume (state.json is missing).")
        state, meta = load_checkpoint(run_dir, state, cfg=cfg, restore_rng=True)
        start, skipped, bpb0 = int(meta["batch_index"]), int(meta["skipped"]), meta.get("val_bpb_start")
        if os.path.exists(metrics_path):  # drop lines written after the checkpoint
            with open(metrics_path, "r+b") as f:
                f.truncate(min(int(meta["metrics_bytes"]), os.path.getsize(metrics_path)))
    else:
        _prepare_run_dir(run_dir, force=force)
        _write_json(os.path.join(run_dir, "config.json"), {
            "format": RUN_FORMAT, "format_version": 1, "library_version": __version__,
            "model": cfg.to_dict(), "train": dataclasses.asdict(args), "resolved": resolved._asdict(),
        })
        start, skipped, bpb0 = 0, 0, None
        open(metrics_path, "w").close()
    step_fn = make_train_step(cfg, opt, policy=policy, accum_steps=resolved.accum_steps, remat=_remat(args.remat),
                              max_grad_norm=args.max_grad_norm or None, donate=True)
    step_fn = _hygiene(step_fn, args.gc_every, device)
    val_batches = [sample_batch(val_data, micro, T, seed=VAL_SEED, index=i, device=device)
                   for i in range(args.eval_batches)]
    end = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    dynamic = hasattr(state.loss_scale, "min_loss_scale")
    log = open(metrics_path, "a", encoding="utf-8")
    bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=quiet, dynamic_ncols=True, file=sys.stderr)
    it, bpb, tokens, step_s, status, saved_at = start, None, 0.0, 0.0, "done", start

    def record(obj: dict) -> None:
        # Strict JSON has no nan or inf: write those as strings so every reader can parse the file.
        obj = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
        log.write(json.dumps(obj) + "\n")
        log.flush()

    def checkpoint() -> None:
        nonlocal saved_at
        saved_at = it
        log.flush()
        meta = {"batch_index": it, "skipped": skipped, "metrics_bytes": log.tell(), "val_bpb_start": bpb0}
        save_checkpoint(run_dir, state, cfg=cfg, meta=meta)
        path = os.path.join(run_dir, "params.safetensors")
        try:
            save_params(path, state.params, cfg, dtype=torch.float16)
        except ValueError:  # a value beyond fp16's range: keep the params whole
            save_params(path, state.params, cfg, dtype=torch.float32)

    def run_eval() -> float:
        nats = evaluate(state.params, cfg, policy, val_batches)
        record({"kind": "eval", "step": it, "val_loss": nats, "val_bpb": nats / math.log(2)})
        if not quiet:
            bar.write(f"step {it}: validation {nats / math.log(2):.3f} bits/byte", file=sys.stderr)
        return nats / math.log(2)

    try:
        with _CtrlC() as ctrl_c:
            if not resume:
                bpb = bpb0 = run_eval()
                checkpoint()
            while it < end and not ctrl_c.requested:
                batch = sample_batch(train_data, args.batch_size, T, seed=args.seed, index=it, device=device)
                lr = float(sched(int(state.step)))
                t0 = time.perf_counter()
                state, m = step_fn(state, batch)
                vals = {k: float(v) for k, v in m.items()}  # one host sync, which the step made anyway
                step_s += time.perf_counter() - t0
                it += 1
                tokens += vals["tokens"]
                skipped += int(vals["skipped"])
                peak = _peak_bytes(device)
                record({"kind": "train", "step": it, **vals, "skipped": bool(vals["skipped"]), "lr": lr,
                        "tokens_per_s": tokens / step_s, "peak_bytes": peak})
                bar.set_postfix_str(f"loss {vals['loss']:.3f} | {tokens / step_s:,.0f} tok/s | peak {_mib(peak)} | "
                                    f"scale {vals['loss_scale']:g} | skipped {skipped}", refresh=False)
                bar.update(1)
                if vals["skipped"] and not (dynamic and vals["loss_scale"] > float(state.loss_scale.min_loss_scale)):
                    status = "diverged"
                    break
                if it % resolved.eval_interval == 0 or it == end:
                    bpb = run_eval()
                    checkpoint()
            if ctrl_c.requested and status == "done":
                status = "interrupted"
                checkpoint()
            elif status == "done" and end < args.steps:
                status = "stopped"
            if status in ("done", "stopped") and bpb is None:  # a resumed run with no step left to take
                bpb = run_eval()
    finally:
        bar.close()
        log.close()
    seconds = time.perf_counter() - t_start
    tps = tokens / step_s if step_s else 0.0
    peak = _peak_bytes(device)
    if status == "diverged":
        message = (f"memopt: error: train: the loss became non-finite at step {it} ({vals['loss']}) under policy "
                   f"{resolved.policy} with no loss scaling left to recover; stopped. The last good checkpoint (step "
                   f"{saved_at}) is kept in {run_dir}. Lower --lr (now {args.lr:g}) or --max-grad-norm, "
                   "or use another --policy.")
    elif status == "interrupted":
        message = (f"memopt: interrupted at step {it}; checkpoint saved in {run_dir}. "
                   f"Continue with: memopt train --resume {run_dir}")
    else:
        before = f"{bpb0:.3f} -> " if bpb0 is not None else ""
        message = (f"memopt: {status} at step {it}/{args.steps} in {seconds:.1f} s, {tps:,.0f} tokens/s, "
                   f"validation {before}{bpb:.3f} bits/byte, peak memory {_mib(peak)}, skipped {skipped}; "
                   f"run directory {run_dir} (sample with: memopt sample {run_dir})")
    return TrainResult(status, it, bpb0, bpb, seconds, tps, peak, run_dir, message)
