"""A run of ``memopt train``: its arguments and what "auto" resolves to.

``config.json`` records a run as :class:`TrainArgs` (every argument) and :class:`Resolved` (what
the "auto" ones became, reused on resume); the run directory and its files are ``run_dir.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import torch

from ..data.batch import rows_per_microbatch
from ..io.files import machine_memory
from ..memory.ledger import choose_loss_chunk
from ..memory.rss import rss_peak
from .format import format_bytes
from ..model.cce_loss import CCE, check_cce
from ..model.config import ModelConfig, get_config
from ..model.layout import param_shapes
from ..model.remat import remat_layers
from ..train.loss_scale import loss_scale_from_spec
from ..train.precision import get_policy

__all__ = [
    "CPU_DEFAULT_POLICY", "TrainArgs", "Resolved", "resolve_args", "resolve_device", "resolve_threads", "peak_bytes",
    "choose_threads", "check_model_fits",
]

# Steps from which --compile auto compiles a bf16 run on the CPU. Tiny preset, mixed bf16, 2 threads:
# 420 steps took 78.2 s compiled (19.5 s of it compiling) against 76.9 s eager, 1000 steps 150.9 s
# (7.5 s compiling, warm cache) against 197.3 s; a cold compile takes 20-30 s. fp32 gains too little
# (compiled / eager step 0.93-1.03, benchmarks/run.py section 3), so it is not compiled by auto.
CPU_COMPILE_MIN_STEPS = 1000
FLAGS = ("--batch-size", "--accum-steps")  # how the command names the batch size and accumulation steps
# On the CPU "auto" takes the policy measured fastest for the tiny preset (batch 32 = 4 x 8,
# sequence 128) on a 2-core AVX-512 machine with bf16 instructions; without bf16 instructions
# bf16 matmuls are emulated, so fp32 is taken there.
CPU_DEFAULT_POLICY = "mixed_bf16"


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
    batch_size: int = 32  # rows per optimizer step, over all ranks (each takes batch_size / ranks)
    accum_steps: int | None = None  # micro-batches per step and rank (None: the first of 4, 2, 1 that divides)
    seq_len: int | None = None  # tokens per row (None: block_size)
    remat: str = "none"  # "none", "all" or N (every N-th block)
    loss_chunk: str = "auto"  # tokens per chunk of the head and loss: "auto" (the ledger's choice), "none", N or "cce"
    compile: str = "auto"  # torch.compile the differentiated loss: "auto" (CUDA; CPU bf16 from 1000 steps), on, off
    lr: float = 2e-3  # peak learning rate
    min_lr: float | None = None  # final learning rate of the cosine schedule (None: lr / 10)
    warmup_steps: int | None = None  # linear warmup steps (None: steps // 8, at most 100)
    schedule: str = "cosine"  # "cosine" or "constant" (after the warmup)
    weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    max_grad_norm: float = 1.0  # global-norm clipping (0: off)
    steps: int = 420  # optimizer steps (batches) in the whole run (about 3 minutes on 2 CPU cores)
    stop_at: int | None = None  # stop (with a checkpoint) at this step; the schedule still spans `steps`
    eval_interval: int | None = None  # steps between evaluations and checkpoints (None: steps // 6)
    eval_batches: int = 8  # validation batches of batch_size // accum_steps rows, shared out over the ranks
    corpus: str | None = None  # a text file or folder (None: the built-in corpus)
    seed: int = 0  # init and batch order
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    threads: str = "auto"  # CPU threads: "auto" (the cores not busy now) or a number
    gc_every: int = 0  # memory hygiene every N steps (0: off)
    zero_stage: int = 0  # under torchrun: 0 replicated, 1 optimizer state sharded, 2 gradients too
    dist_timeout: float = 600.0  # seconds before a missing rank or a stuck collective is an error


class Resolved(NamedTuple):
    """What the "auto" arguments resolved to; stored in config.json and reused on resume."""

    policy: str
    loss_scale: str
    accum_steps: int
    seq_len: int
    warmup_steps: int
    eval_interval: int
    threads: int
    loss_chunk: int | str | None = None  # None: the whole logits (and runs recorded before the chunked loss); "cce"
    compile: bool = False  # torch.compile the differentiated loss


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (without them bf16 matmuls are emulated, and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(spec: str) -> torch.device:
    """The device of ``--device`` (auto: CUDA when available); ValueError for one this machine lacks."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}.")
    return device


def choose_threads(spec: str) -> tuple[int, str]:
    """``(threads, why)`` for ``--threads``: a number, or auto (the idle cores, shared by the ranks on this machine)."""
    if spec != "auto":
        if not spec.isdigit() or int(spec) < 1:
            raise ValueError(f"train: --threads must be auto or an integer >= 1, got {spec!r}.")
        return int(spec), "--threads"
    cores = torch.get_num_threads()
    try:  # threads beyond the idle cores spin against other processes (measured 7x slower)
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this machine share the cores
    n = max(1, min(cores, ((os.cpu_count() or cores) - int(load)) // ranks_here))
    shared = f", shared by {ranks_here} ranks" if ranks_here > 1 else ""
    return n, (f"auto: {os.cpu_count() or cores} cores, load average {load:.1f}, so {n} idle{shared}; "
               "pass --threads N to choose")


def resolve_threads(spec: str) -> int:
    """CPU threads of ``--threads``: a number, or auto (the idle cores, shared by the ranks on this machine)."""
    return choose_threads(spec)[0]


def check_model_fits(cfg: ModelConfig, *, caller: str, source: str) -> None:
    """Refuse a model whose params, gradients and AdamW moments (fp32) alone exceed this machine's memory.

    Checked before anything is allocated, so a damaged or mistyped shape is a clear error, not a
    process the system kills.
    """
    n = sum(math.prod(shape) for shape in param_shapes(cfg).values())
    need, total = 16 * n, machine_memory()
    if total and need > total:
        raise ValueError(
            f"{caller}: {source} describes a model of {n:,} params, whose fp32 params, gradients and AdamW moments "
            f"alone take {format_bytes(need)}, more than this machine's {format_bytes(total)} of memory; choose a "
            "smaller model."
        )


def resolve_args(args: TrainArgs, device: torch.device, world_size: int = 1):
    """``(cfg, Resolved)``: the model and the "auto" choices for ``device`` and ``world_size`` ranks, checked."""
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k)}
    cfg = get_config(args.preset, **overrides)
    check_model_fits(cfg, caller="train", source="--preset " + args.preset + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()))
    policy = args.policy
    if policy == "auto":
        if device.type == "cuda":
            policy = "mixed_bf16" if torch.cuda.is_bf16_supported() else "mixed_fp16"
        else:
            policy = CPU_DEFAULT_POLICY if cpu_has_bf16() else "fp32"
    pol = get_policy(policy)  # raises for a string it cannot read
    loss_scale = args.loss_scale
    if loss_scale == "auto":
        loss_scale = "dynamic" if pol.compute_dtype == torch.float16 else "none"
    try:
        loss_scale_from_spec(loss_scale)
    except ValueError:
        raise ValueError(f"train: --loss-scale must be auto, none, dynamic or a number > 0, got {loss_scale!r}.") from None
    rows = args.batch_size // world_size if args.batch_size % world_size == 0 else args.batch_size
    accum = args.accum_steps or next(k for k in (4, 2, 1) if rows % k == 0)
    rows_per_microbatch(args.batch_size, accum, world_size, caller="train", names=FLAGS)
    seq_len = args.seq_len or cfg.block_size
    if seq_len > cfg.block_size:
        raise ValueError(
            f"train: --seq-len {seq_len} exceeds the block size {cfg.block_size}; lower it or raise --block-size."
        )
    try:
        remat_layers(args.remat, cfg.n_layer)
    except ValueError:
        raise ValueError(f"train: --remat must be none, all, an integer N >= 1 (every N-th block) or block indices "
                         f"such as 0,2; got {args.remat!r}.") from None
    micro_tokens = rows // accum * seq_len
    if args.loss_chunk == "auto":
        loss_chunk = choose_loss_chunk(cfg, micro_tokens)
    elif args.loss_chunk == "none":
        loss_chunk = None
    elif args.loss_chunk.isdigit() and int(args.loss_chunk) >= 1:
        loss_chunk = int(args.loss_chunk)
    elif args.loss_chunk == CCE:
        loss_chunk = CCE
    else:
        raise ValueError(f"train: --loss-chunk must be auto, none, an integer >= 1 (tokens per chunk) or cce, got "
                         f"{args.loss_chunk!r}.")
    if args.compile not in ("auto", "on", "off"):
        raise ValueError(f"train: --compile must be auto, on or off, got {args.compile!r}.")
    # On the CPU a compile pays back over a long bf16 run only (ARCHITECTURE.md, "Compiling the step":
    # measured with --compile on and off); on CUDA always (not around cce's kernels).
    long_bf16 = device.type == "cpu" and pol.compute_dtype == torch.bfloat16 and args.steps >= CPU_COMPILE_MIN_STEPS
    compiled = args.compile == "on" or (args.compile == "auto" and loss_chunk != CCE
                                        and (device.type == "cuda" or long_bf16))
    if loss_chunk == CCE:
        if device.type != "cuda":
            raise ValueError(f"train: --loss-chunk cce runs cut-cross-entropy's CUDA kernels; this run is on "
                             f"{device.type}: use --loss-chunk auto there.")
        check_cce("train", compiled=compiled, compute_dtype=pol.compute_dtype)
    warmup = min(100, args.steps // 8) if args.warmup_steps is None else args.warmup_steps
    if warmup < 0 or warmup > args.steps:
        raise ValueError(f"train: --warmup-steps must be between 0 and --steps ({args.steps}), got {warmup}.")
    if args.gc_every < 0:
        raise ValueError(f"train: --gc-every must be >= 0, got {args.gc_every}.")
    if not args.max_grad_norm >= 0 or not math.isfinite(args.max_grad_norm):
        raise ValueError(f"train: --max-grad-norm must be a finite number >= 0 (0 turns clipping off), got "
                         f"{args.max_grad_norm}.")
    for flag, value, ok, want in (("--lr", args.lr, lambda v: v >= 0, ">= 0"),
                                  ("--min-lr", args.min_lr, lambda v: v is None or v >= 0, ">= 0"),
                                  ("--weight-decay", args.weight_decay, lambda v: v >= 0, ">= 0"),
                                  ("--beta1", args.beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
                                  ("--beta2", args.beta2, lambda v: 0 <= v < 1, "in [0, 1)")):
        if not ok(value) or (value is not None and not math.isfinite(value)):
            raise ValueError(f"train: {flag} must be a finite number {want}, got {value}.")
    if args.eval_batches < 1:
        raise ValueError(f"train: --eval-batches must be >= 1, got {args.eval_batches}.")
    interval = args.eval_interval or max(1, args.steps // 6)
    return cfg, Resolved(policy, loss_scale, accum, seq_len, warmup, interval, resolve_threads(args.threads), loss_chunk,
                         compiled)


def peak_bytes(device: torch.device) -> int:
    """CUDA max_memory_allocated, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return rss_peak()
