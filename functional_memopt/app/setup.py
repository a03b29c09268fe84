"""The set-up of ``memopt train``: everything before the first step, and what the loop carries.

``set_up`` checks every argument (the optimizer and the step are built) before the run directory
is created or changed, reads the corpus, builds the donated step (and, through ``Run.make_step``,
its undonated twin for the rare rerun of a non-finite update), and starts or resumes the state and
the run files. ``Run`` is what it hands to the loop (``loop``), which moves its state and counters.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from .._version import __version__
from ..data.batch import rows_per_microbatch, sample_batch
from ..data.corpus import load_corpus, train_val_split
from ..io.checkpoint import checkpoint_info, has_checkpoint, load_checkpoint
from ..memory.hygiene import with_memory_hygiene
from ..model.config import ModelConfig
from ..model.layout import init_params
from ..optim.adamw import adamw, decay_mask
from ..optim.schedules import linear_warmup, warmup_cosine
from ..parallel.process_group import DistInfo
from ..parallel.replicated import shard_batch
from ..parallel.zero import data_parallel
from ..train.loss_scale import loss_scale_from_spec
from ..train.parallelism import Parallelism, single_process
from ..train.precision import get_policy
from ..train.step import TrainState, init_train_state, make_train_step
from .records import parse_meta
from .resume import repair_params, steps_change
from .run import FLAGS, Resolved, TrainArgs
from .run_dir import RUN_FORMAT, RunFiles, prepare_run_dir, remove_leftovers

__all__ = ["Run", "set_up", "build_optimizer", "batch_at", "say", "VAL_SEED"]

VAL_SEED = 1234  # validation batches do not depend on --seed, so runs with different seeds compare


@dataclasses.dataclass
class Run:
    """What the set-up made, and where the loop stands (the loop moves ``state`` and the counters)."""

    args: TrainArgs
    cfg: ModelConfig
    resolved: Resolved
    run_dir: str
    device: torch.device
    info: DistInfo
    parallel: Parallelism | None  # None: one process, the plain step
    optimizer: Any
    schedule: Any
    step_fn: Any
    make_step: Any  # donate -> a step built like step_fn (the replay of a non-finite update runs one undonated)
    state: TrainState
    files: RunFiles
    train_data: torch.Tensor
    val_batches: list
    end: int  # the step this session stops at
    it: int  # batches consumed
    skipped: int  # skipped steps over the whole run
    bpb0: float | None  # the first evaluation's bits per byte
    bpb: float | None = None  # the latest evaluation's
    tokens: float = 0.0  # counted tokens trained on in this session
    step_s: float = 0.0  # seconds spent in steps in this session
    saved_at: int = 0  # step of the newest checkpoint
    step_times: list = dataclasses.field(default_factory=list)  # seconds of each step in this session
    stop_signal: int = 0  # the exit code of a stop request (130 SIGINT, 143 SIGTERM)
    failure: str = ""  # why the run stopped early, for the summary


def build_optimizer(args: TrainArgs, warmup: int):
    final = args.lr / 10 if args.min_lr is None else args.min_lr
    if args.schedule == "cosine":
        sched = warmup_cosine(args.lr, warmup, args.steps, final=final)
    else:
        sched = linear_warmup(args.lr, warmup)
    opt = adamw(sched, b1=args.beta1, b2=args.beta2, weight_decay=args.weight_decay, mask=decay_mask)
    return opt, sched


def say(info: DistInfo, text: str) -> None:
    """A line for the person at the terminal (stderr, rank 0)."""
    if info.rank == 0:
        print(text, file=sys.stderr, flush=True)


def set_up(args: TrainArgs, cfg: ModelConfig, resolved: Resolved, run_dir: str, device: torch.device,
            info: DistInfo, *, resume: bool, force: bool, config: dict | None) -> Run:
    """Data, optimizer, state (fresh or resumed), step and run files: everything before the first step.

    Every argument is checked (the optimizer and the step are built) before the run directory is
    created or changed.
    """
    rows_per_microbatch(args.batch_size, resolved.accum_steps, info.world_size, caller="train", names=FLAGS)
    parallel = data_parallel(zero_stage=args.zero_stage) if info.world_size > 1 else None
    on_main = (parallel or single_process()).on_main
    if not resume:  # refuse early, before the corpus is read
        on_main(lambda: prepare_run_dir(run_dir, force=force, dry_run=True), what="checking the run directory")
    train_data, val_data = train_val_split(load_corpus(args.corpus))
    T = resolved.seq_len
    for name, part in (("training", train_data), ("validation", val_data)):
        if len(part) <= T:
            raise ValueError(f"train: the corpus's {name} part holds {len(part)} bytes, too few for sequences of "
                             f"{T}; use a longer --corpus or a shorter --seq-len.")
    policy = get_policy(resolved.policy)
    opt, sched = build_optimizer(args, resolved.warmup_steps)

    def make_step(donate: bool):
        fn = make_train_step(cfg, opt, policy=policy, accum_steps=resolved.accum_steps, remat=args.remat,
                             max_grad_norm=args.max_grad_norm or None, loss_chunk=resolved.loss_chunk, donate=donate,
                             parallel=parallel, compile=resolved.compile)
        if args.gc_every > 0:
            fn = with_memory_hygiene(fn, gc_every=args.gc_every, empty_cache=device.type == "cuda", stats=False)
        return fn

    step_fn = make_step(True)
    state = init_train_state(init_params(cfg, seed=args.seed, device=device), opt, policy=policy, parallel=parallel,
                             loss_scale=loss_scale_from_spec(resolved.loss_scale, device=device))
    files = RunFiles(run_dir, main=info.rank == 0)
    start, skipped, bpb0, bpb = 0, 0, None, None
    if resume:
        if not has_checkpoint(run_dir):
            raise ValueError(f"train: {run_dir!r} holds no checkpoint to resume (state.json is missing: the run "
                             "stopped before its first checkpoint); start it again with --force.")
        record = checkpoint_info(run_dir)
        meta = parse_meta(record["meta"], run_dir, step=record.get("step"))
        state, _ = load_checkpoint(run_dir, state, cfg=cfg, parallel=parallel, optimizer=opt)
        start, skipped, bpb0, bpb = meta["batch_index"], meta["skipped"], meta["val_bpb_start"], meta["val_bpb"]
        gone = on_main(lambda: remove_leftovers(run_dir), what="removing temporary files") or []
        if gone:
            say(info, f"memopt: removed {len(gone)} temporary file(s) of interrupted writes: {', '.join(gone[:3])}")
        if "sha256" not in record:
            say(info, f"memopt: note: the checkpoint in {run_dir} (step {start}) has no checksum (an earlier version "
                       "wrote it); its values were checked, its bytes cannot be.")
        on_main(lambda: repair_params(files, state, cfg, run_dir, lambda text: say(info, text)),
                what="checking params.safetensors")
        warning = files.reopen(meta["metrics_bytes"], meta.get("metrics_sha256"))
        if warning:
            say(info, warning)
    else:
        config = {"format": RUN_FORMAT, "format_version": 1, "library_version": __version__,
                  "model": cfg.to_dict(), "train": dataclasses.asdict(args), "resolved": resolved._asdict()}
        on_main(lambda: files.start(config, force=force), what="preparing the run directory")
    val_rows = args.batch_size // resolved.accum_steps  # one micro-batch per rank
    val_batches = [sample_batch(val_data, val_rows, T, seed=VAL_SEED, index=i, device=device)
                   for i in range(args.eval_batches)]
    end = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    run = Run(args, cfg, resolved, run_dir, device, info, parallel, opt, sched, step_fn, make_step, state, files,
               train_data, val_batches, end, start, skipped, bpb0, bpb, saved_at=start)
    if resume and config is not None and start < end:
        _record_steps_change(run, config)
    return run


def _record_steps_change(run: Run, config: dict) -> None:
    """A resumed run whose --steps differs: say what happens to the schedule and record it in config.json."""
    change = steps_change(config, run.args, run.schedule, build_optimizer(
        dataclasses.replace(run.args, steps=config["train"]["steps"]), run.resolved.warmup_steps)[1],
        at=run.it, count=int(run.state.step))
    if change is not None:
        note, new = change
        say(run.info, note)
        (run.parallel or single_process()).on_main(lambda: run.files.write_config(new), what="updating config.json")


def batch_at(run: Run, index: int):
    """The batch of step ``index + 1`` (a function of the seed and the index), this rank's rows of it."""
    batch = sample_batch(run.train_data, run.args.batch_size, run.resolved.seq_len, seed=run.args.seed, index=index,
                         device=run.device)
    return shard_batch(batch, run.info.rank, run.info.world_size) if run.info.world_size > 1 else batch


