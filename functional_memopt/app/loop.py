"""The training loop behind ``memopt train``: set-up, one loop, a summary.

A checkpoint is written at the start, every ``eval_interval`` steps, at the end and on Ctrl-C;
batches are a function of (seed, index), so a resumed run takes exactly the steps an unbroken run
would. What the run directory holds is described in ``run``.

One process calls ``make_train_step`` directly. Under torchrun the step is the same, with
``parallel=data_parallel(zero_stage=...)``: each rank builds the same global batch and trains on
its rows (``shard_batch``), evaluation is shared out the same way, and rank 0 alone writes files
and reports.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, NamedTuple

import optree
import torch
import torch.distributed as dist

from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..io.files import disk_full_error, is_disk_full
from ..model.config import ModelConfig
from ..parallel.process_group import DistInfo, collective, comm_device, world
from ..parallel.replicated import shard_batch
from ..train.guard import NonFiniteUpdateError
from ..train.parallelism import single_process
from ..train.precision import get_policy, with_policy
from ..train.step import make_loss_fn
from .faults import poison_state
from .format import format_bytes
from .interrupt import StopRequest
from .run import Resolved, TrainArgs, peak_bytes
from .setup import Run, batch_at, say, set_up

__all__ = ["TrainResult", "train", "evaluate"]


class TrainResult(NamedTuple):
    """How a run ended."""

    status: str  # "done", "stopped" (at stop_at), "complete" (nothing left to train), "interrupted" (SIGINT or
    # SIGTERM: exit_code tells which) or "diverged"
    step: int  # batches consumed
    val_bpb_start: float | None  # validation bits per byte of the run's first evaluation
    val_bpb: float | None  # ... of its last evaluation
    seconds: float  # wall time of this session
    tokens_per_s: float  # counted tokens per second of training steps in this session
    peak_bytes: int  # CUDA max_memory_allocated, or the process's peak RSS on the CPU
    run_dir: str
    message: str  # the summary line
    exit_code: int = 0  # what the command exits with


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


def _checkpoint(run: Run) -> None:
    meta = {"batch_index": run.it, "skipped": run.skipped, "metrics_bytes": run.files.tell(),
            "metrics_sha256": run.files.digest(), "val_bpb_start": run.bpb0, "val_bpb": run.bpb}
    hint = f" Then continue with: memopt train --resume {run.run_dir}"
    try:
        save_checkpoint(run.run_dir, run.state, cfg=run.cfg, meta=meta, parallel=run.parallel,
                        optimizer=run.optimizer)
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise disk_full_error(f"{err.strerror or err}{hint}") from None
    run.saved_at = run.it
    step = int(run.state.step)
    try:
        (run.parallel or single_process()).on_main(lambda: run.files.save_params(run.state.params, run.cfg, step),
                                                   what="writing params.safetensors")
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise disk_full_error(f"{err.strerror or err} The checkpoint of step {run.it} was saved; params.safetensors "
                              f"is older, and a resume rewrites it.{hint}") from None


def _replay_and_skip(run: Run, batch, err: NonFiniteUpdateError, lr: float) -> dict:
    """After a donated update wrote inf or nan: the state of the step before, then that step run undonated.

    The donated step updated its state in place before the guard saw the result, so the state is
    gone. It is rebuilt bit for bit: the newest checkpoint, then the steps since (batches are a
    function of the index, and the steps are deterministic). The failed step then runs once more
    without donation (one more copy of params and optimizer state, for this step only), which
    skips a non-finite update like an overflow step, or applies it if it is finite this time (a
    transient fault). Returns that step's metrics; ``run.state`` is its new state.
    """
    like = optree.tree_map(lambda x: torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape), run.state)
    run.state = None  # the spent state is freed before the checkpoint is read
    run.state, _ = load_checkpoint(run.run_dir, like, cfg=run.cfg, parallel=run.parallel, optimizer=run.optimizer)
    for index in range(run.saved_at, run.it):
        run.state, _ = run.step_fn(run.state, batch_at(run, index))
    run.state, m = run.make_step(False)(run.state, batch)
    what = ("skipped it" if bool(m["nonfinite_update"])
            else "run again, it was finite (a transient fault), so it was applied")
    say(run.info, f"memopt: the update of step {err.step} (learning rate {lr:.3g}) would have written inf or nan into "
                   f"{', '.join(err.leaves[:4])}{' ...' if len(err.leaves) > 4 else ''} from finite gradients; "
                   f"{what} (rebuilt from the checkpoint of step {run.saved_at}, {run.it - run.saved_at} step(s) "
                   "replayed).")
    return m


def _evaluate(run: Run, bar, quiet: bool) -> float:
    nats = evaluate(run.state.params, run.cfg, get_policy(run.resolved.policy), run.val_batches, info=run.info)
    run.files.record({"kind": "eval", "step": run.it, "val_loss": nats, "val_bpb": nats / math.log(2)})
    if not quiet and run.info.rank == 0:
        bar.write(f"step {run.it}: validation loss {nats / math.log(2):.3f} bits/byte", file=sys.stderr)
    return nats / math.log(2)


def _loop(run: Run, bar, stop: StopRequest, *, resume: bool, quiet: bool) -> tuple[str, dict]:
    """Train from ``run.it`` to ``run.end``; returns the status and the last step's metrics."""
    args, status, vals = run.args, "done", {}
    if not resume:
        run.bpb = run.bpb0 = _evaluate(run, bar, quiet)
        _checkpoint(run)
    dynamic = hasattr(run.state.loss_scale, "min_loss_scale")
    while run.it < run.end and not stop.agreed():
        batch = batch_at(run, run.it)
        lr = float(run.schedule(int(run.state.step)))
        t0 = time.perf_counter()
        poison_state(run.state, run.it + 1)  # FUNCTIONAL_MEMOPT_FAULT=step:begin@<n>=poison, or nothing
        try:
            run.state, m = run.step_fn(run.state, batch)
        except NonFiniteUpdateError as err:  # the donated state is spent: replay to here, then skip the update
            m = _replay_and_skip(run, batch, err, lr)
        vals = {k: float(v) for k, v in m.items()}  # one host sync, which the step made anyway
        run.step_times.append(time.perf_counter() - t0)
        run.step_s += run.step_times[-1]
        run.it += 1
        _report_step(run, bar, vals, lr)
        if vals["skipped"] and not (dynamic and vals["loss_scale"] > float(run.state.loss_scale.min_loss_scale)):
            if vals["nonfinite_update"]:
                run.failure = (f"the update of step {run.it} (learning rate {lr:.3g}) would have written inf or nan "
                               "from finite gradients (it was skipped)")
            return "diverged", vals  # non-finite with no loss scaling left to recover
        if run.it % run.resolved.eval_interval == 0 or run.it == run.end:
            run.bpb = _evaluate(run, bar, quiet)
            _checkpoint(run)
    if stop.agreed():  # every rank asks, so all checkpoint or none does
        status = "interrupted"
        run.stop_signal = stop.exit_code
        _checkpoint(run)
    elif run.end < args.steps:
        status = "stopped"
    return status, vals


def _report_step(run: Run, bar, vals: dict, lr: float) -> None:
    """Count the step just taken, add its row to metrics.jsonl and show it on the bar."""
    run.tokens += vals["tokens"]  # of all ranks: the metrics are global
    run.skipped += int(vals["skipped"])
    peak = peak_bytes(run.device)
    run.files.record({"kind": "train", "step": run.it, **vals, "skipped": bool(vals["skipped"]),
                      "nonfinite_update": bool(vals["nonfinite_update"]), "lr": lr,
                      "tokens_per_s": run.tokens / run.step_s, "peak_bytes": peak})
    bar.set_postfix_str(f"loss {vals['loss'] / math.log(2):.3f} bits/byte | {run.tokens / run.step_s:,.0f} tok/s"
                        f" | peak {_peak_label(run.device)} {format_bytes(peak, unit='MiB', digits=0)} | scale "
                        f"{vals['loss_scale']:g} | skipped {run.skipped}", refresh=False)
    bar.update(1)


def _peak_label(device: torch.device) -> str:
    """What the bar's peak memory is: the process's resident memory on the CPU, allocated tensors on CUDA."""
    return "CUDA" if device.type == "cuda" else "RSS"


def _summary(run: Run, status: str, vals: dict, seconds: float) -> TrainResult:
    tps = run.tokens / run.step_s if run.step_s else 0.0
    peak = peak_bytes(run.device)
    code = 0
    if status == "diverged":
        what = run.failure or (f"the loss became non-finite at step {run.it} ({vals['loss']}) under policy "
                               f"{run.resolved.policy} with no loss scaling left to recover")
        message = (f"memopt: error: train: {what}; stopped. The last good checkpoint (step {run.saved_at}) is kept in "
                   f"{run.run_dir}. Lower --lr (now {run.args.lr:g}) or --max-grad-norm, or use another --policy.")
        code = 1
    elif status == "interrupted":
        by = "SIGTERM" if run.stop_signal == 143 else "Ctrl-C"
        message = (f"memopt: interrupted at step {run.it} by {by}; checkpoint saved in {run.run_dir}. "
                   f"Continue with: memopt train --resume {run.run_dir}")
        code = run.stop_signal or 130
    elif status == "complete":
        at = f" (validation {run.bpb:.3f} bits/byte)" if run.bpb is not None else ""
        if run.it >= run.args.steps:
            message = (f"memopt: the run in {run.run_dir} is already complete at step {run.it}/{run.args.steps}{at}; "
                       f"nothing to train. To train longer, pass a larger --steps: memopt train --resume "
                       f"{run.run_dir} --steps {2 * run.args.steps}")
        else:
            message = (f"memopt: the run in {run.run_dir} is already at step {run.it}, at or past --stop-at "
                       f"{run.args.stop_at}{at}; nothing to train. Leave out --stop-at to go on to step "
                       f"{run.args.steps}.")
    else:
        ranks = (f" on {run.info.world_size} ranks (ZeRO stage {run.parallel.zero_stage})"
                 if run.parallel is not None else "")
        before = f"{run.bpb0:.3f} -> " if run.bpb0 is not None else ""
        threads = f" on {torch.get_num_threads()} CPU thread(s)" if run.device.type == "cpu" else ""
        if run.resolved.compile and len(run.step_times) > 1:  # the first step compiles
            threads += f", compiling {run.step_times[0] - sorted(run.step_times[1:])[len(run.step_times[1:]) // 2]:.1f} s"
        message = (f"memopt: {status} at step {run.it}/{run.args.steps} in {seconds:.1f} s{ranks}{threads}, "
                   f"{tps:,.0f} tokens/s, validation loss {before}{run.bpb:.3f} bits/byte, peak "
                   f"{_peak_label(run.device)} {format_bytes(peak, unit='MiB', digits=0)}, skipped {run.skipped}; "
                   f"run directory {run.run_dir} (sample with: memopt sample {run.run_dir})")
    return TrainResult(status, run.it, run.bpb0, run.bpb, seconds, tps, peak, run.run_dir, message, code)


def train(
    args: TrainArgs, cfg: ModelConfig, resolved: Resolved, run_dir: str, device: torch.device,
    *, resume: bool = False, force: bool = False, quiet: bool = False, info: DistInfo | None = None,
    config: dict | None = None, header: str | None = None,
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
            of the default process group, or one process without one). ``args.batch_size`` is the
            global batch, split evenly over the ranks, and ``resolved.accum_steps`` counts each
            rank's micro-batches.
        config: on resume, the run's config.json as read: a different ``args.steps`` is then said
            and recorded there (``steps_history``).
        header: a line printed (stderr, rank 0) once the set-up has succeeded, e.g. the threads chosen.

    Returns:
        A TrainResult (the same on every rank); progress goes to stderr from rank 0, and nothing is
        printed to stdout.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    info = info or DistInfo(*world(), 0, device)  # the default process group, if the caller made one
    run = set_up(args, cfg, resolved, run_dir, device, info, resume=resume, force=force, config=config)
    if header:
        say(info, header)
    if resume and run.it >= run.end:  # nothing left to train: no step, no evaluation, no metrics row
        run.files.close()
        return _summary(run, "complete", {}, time.perf_counter() - t_start)
    bar = tqdm(total=run.end, initial=run.it, desc="train", unit="step", disable=quiet or info.rank != 0,
               dynamic_ncols=True, file=sys.stderr)
    try:
        with StopRequest(info) as stop:
            status, vals = _loop(run, bar, stop, resume=resume, quiet=quiet)
    finally:
        bar.close()
        run.files.close()
    return _summary(run, status, vals, time.perf_counter() - t_start)
