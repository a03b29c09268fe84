"""The training loop behind ``memopt train``: progress, evaluation, checkpoints, on one or many ranks.

A checkpoint is written at the start, every ``eval_interval`` steps, at the end and on Ctrl-C;
batches are a function of (seed, index), so a resumed run takes exactly the steps an unbroken run
would. What the run directory holds is described in ``_run``.

Under torchrun each rank builds the same global batch and trains on its rows (``shard_batch``);
the step is ``make_data_parallel_step`` with the ZeRO stage asked for, evaluation is shared out
the same way, and rank 0 alone writes files and reports. With one process all of this reduces to
the single-process step, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ._checkpoint import has_checkpoint
from ._config import ModelConfig
from ._data import load_corpus, sample_batch, train_val_split
from ._distributed import (
    init_data_parallel_state,
    load_distributed_checkpoint,
    make_data_parallel_step,
    save_distributed_checkpoint,
    shard_batch,
)
from ._loss_scale import dynamic_loss_scale, no_op_loss_scale, static_loss_scale
from ._model import init_params
from ._optim import adamw, decay_mask
from ._precision import get_policy, with_policy
from ._process_group import DistInfo, collective, comm_device, on_rank_0, world
from ._run import RUN_FORMAT, Resolved, RunFiles, TrainArgs, peak_bytes, prepare_run_dir
from ._schedules import linear_warmup, warmup_cosine
from ._train import make_loss_fn
from ._version import __version__
from ._zero import data_parallel

__all__ = ["TrainResult", "train", "evaluate", "VAL_SEED"]

VAL_SEED = 1234  # validation batches do not depend on --seed, so runs with different seeds compare


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

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _hygiene(step, every: int, device: torch.device):
    """Memory hygiene (gc, and CUDA cache clearing) every ``every`` steps; 0 leaves the step as is."""
    if every <= 0:
        return step
    from ._memory import with_memory_hygiene

    return with_memory_hygiene(step, gc_every=every, empty_cache=device.type == "cuda", stats=False)


def evaluate(params: Any, cfg: ModelConfig, policy, batches: list, *, info: DistInfo | None = None) -> float:
    """Mean validation loss in nats per counted token, under the policy's compute precision.

    With several ranks (``info``), each evaluates its rows of every batch and the sums are added.
    """
    loss = with_policy(make_loss_fn(cfg), policy)
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    ranks = info is not None and info.world_size > 1
    with torch.no_grad():
        for b in batches:
            s, c = loss(params, shard_batch(b, info.rank, info.world_size) if ranks else b)
            total += s.double().cpu()
            count += c.double().cpu()
    if ranks:
        sums = torch.stack([total, count]).to(comm_device(None))
        collective("train", "the evaluation all-reduce", dist.all_reduce, sums)
        total, count = sums.cpu()
    return float(total / count.clamp(min=1))


def train(
    args: TrainArgs, cfg: ModelConfig, resolved: Resolved, run_dir: str, device: torch.device,
    *, resume: bool = False, force: bool = False, quiet: bool = False, info: DistInfo | None = None,
) -> TrainResult:
    """Run (or resume) training into ``run_dir``; see the module docstring for what it writes.

    Args:
        args: the run's arguments; cfg: the model; resolved: the "auto" choices, already made.
        run_dir: the run directory (created; refused when it holds files, unless ``force``).
        device: where to train.
        resume: continue the checkpoint in ``run_dir`` (config.json is not rewritten).
        force: replace a previous run in ``run_dir``.
        quiet: no progress bar.
        info: this process's place in a data-parallel job (from ``init_distributed``; None: that
            of the default process group, or one process without one). ``args.batch_size`` is the global batch, split evenly over the ranks, and
            ``resolved.accum_steps`` counts each rank's micro-batches.

    Returns:
        A TrainResult (the same on every rank); progress goes to stderr from rank 0, and nothing is
        printed to stdout.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    if info is None:  # the default process group, if the caller made one
        info = DistInfo(*world(), 0, device)
    main = info.rank == 0
    rows = args.batch_size // info.world_size  # this rank's rows of every batch
    if rows * info.world_size != args.batch_size or rows % resolved.accum_steps:
        raise ValueError(f"train: --batch-size {args.batch_size} must split into {info.world_size} ranks x "
                         f"{resolved.accum_steps} micro-batches of equal rows; change --batch-size or --accum-steps.")
    if not resume:  # refuse early, before the corpus is read
        on_rank_0(lambda: prepare_run_dir(run_dir, force=force, dry_run=True), what="checking the run directory",
                  caller="train")
    policy = get_policy(resolved.policy)
    val_rows = args.batch_size // resolved.accum_steps  # one micro-batch per rank
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
    # Sharding over one rank changes nothing but the layout: one process keeps the plain one.
    par = data_parallel(zero_stage=args.zero_stage if info.world_size > 1 else 0)
    state = init_data_parallel_state(init_params(cfg, seed=args.seed, device=device), opt, par, loss_scale=ls,
                                     policy=policy)
    files = RunFiles(run_dir, main=main)
    if resume:
        if not has_checkpoint(run_dir):
            raise ValueError(f"train: {run_dir!r} holds no checkpoint to resume (state.json is missing).")
        state, meta = load_distributed_checkpoint(run_dir, state, opt, par, cfg=cfg, restore_rng=True)
        start, skipped, bpb0 = int(meta["batch_index"]), int(meta["skipped"]), meta.get("val_bpb_start")
        files.reopen(int(meta["metrics_bytes"]))
    else:
        config = {"format": RUN_FORMAT, "format_version": 1, "library_version": __version__,
                  "model": cfg.to_dict(), "train": dataclasses.asdict(args), "resolved": resolved._asdict()}
        on_rank_0(lambda: files.start(config, force=force), what="preparing the run directory", caller="train")
        start, skipped, bpb0 = 0, 0, None
    step_fn = make_data_parallel_step(cfg, opt, par, policy=policy, accum_steps=resolved.accum_steps,
                                      remat=_remat(args.remat), max_grad_norm=args.max_grad_norm or None, donate=True)
    step_fn = _hygiene(step_fn, args.gc_every, device)
    val_batches = [sample_batch(val_data, val_rows, T, seed=VAL_SEED, index=i, device=device)
                   for i in range(args.eval_batches)]
    end = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    dynamic = hasattr(state.loss_scale, "min_loss_scale")
    bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=quiet or not main, dynamic_ncols=True,
               file=sys.stderr)
    it, bpb, tokens, step_s, status, saved_at = start, None, 0.0, 0.0, "done", start

    def checkpoint() -> None:
        nonlocal saved_at
        saved_at = it
        meta = {"batch_index": it, "skipped": skipped, "metrics_bytes": files.tell(), "val_bpb_start": bpb0}
        save_distributed_checkpoint(run_dir, state, opt, par, cfg=cfg, meta=meta)
        on_rank_0(lambda: files.save_params(state.params, cfg), what="writing params.safetensors", caller="train")

    def run_eval() -> float:
        nats = evaluate(state.params, cfg, policy, val_batches, info=info)
        files.record({"kind": "eval", "step": it, "val_loss": nats, "val_bpb": nats / math.log(2)})
        if not quiet and main:
            bar.write(f"step {it}: validation {nats / math.log(2):.3f} bits/byte", file=sys.stderr)
        return nats / math.log(2)

    try:
        with _CtrlC(info) as ctrl_c:
            if not resume:
                bpb = bpb0 = run_eval()
                checkpoint()
            while it < end and not ctrl_c.agreed():
                batch = sample_batch(train_data, args.batch_size, T, seed=args.seed, index=it, device=device)
                if info.world_size > 1:
                    batch = shard_batch(batch, info.rank, info.world_size)
                lr = float(sched(int(state.step)))
                t0 = time.perf_counter()
                state, m = step_fn(state, batch)
                vals = {k: float(v) for k, v in m.items()}  # one host sync, which the step made anyway
                step_s += time.perf_counter() - t0
                it += 1
                tokens += vals["tokens"]  # of all ranks: the metrics are global
                skipped += int(vals["skipped"])
                peak = peak_bytes(device)
                files.record({"kind": "train", "step": it, **vals, "skipped": bool(vals["skipped"]), "lr": lr,
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
            interrupted = ctrl_c.agreed()  # every rank asks, so all checkpoint or none does
            if interrupted and status == "done":
                status = "interrupted"
                checkpoint()
            elif status == "done" and end < args.steps:
                status = "stopped"
            if status in ("done", "stopped") and bpb is None:  # a resumed run with no step left to take
                bpb = run_eval()
    finally:
        bar.close()
        files.close()
    seconds = time.perf_counter() - t_start
    tps = tokens / step_s if step_s else 0.0
    peak = peak_bytes(device)
    ranks = f" on {info.world_size} ranks (ZeRO stage {par.zero_stage})" if info.world_size > 1 else ""
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
        message = (f"memopt: {status} at step {it}/{args.steps} in {seconds:.1f} s{ranks}, {tps:,.0f} tokens/s, "
                   f"validation {before}{bpb:.3f} bits/byte, peak memory {_mib(peak)}, skipped {skipped}; "
                   f"run directory {run_dir} (sample with: memopt sample {run_dir})")
    return TrainResult(status, it, bpb0, bpb, seconds, tps, peak, run_dir, message)
