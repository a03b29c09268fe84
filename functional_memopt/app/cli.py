"""The ``memopt`` command: ``train``, ``sample``, ``convert`` and ``memory``.

Run ``memopt train`` with no arguments to train the ``tiny`` preset on the built-in corpus with the
memory techniques that pay on this device; every knob is a flag (``memopt train --help``). Bad
input ends with one line ``memopt: error: ...`` on stderr and exit code 2, never a traceback.

Under torchrun, ``train`` runs data parallel on every rank it starts (gloo on CPUs, NCCL on GPUs);
``--batch-size`` is then the global batch and ``--zero-stage`` shards the optimizer state (1) and
the gradients too (2). Rank 0 alone writes the run directory and prints.

Example:
    memopt train --steps 300 --run-dir runs/demo
    torchrun --standalone --nproc_per_node=2 -m functional_memopt train --zero-stage 2 --run-dir runs/dp
    memopt sample runs/demo --prompt "def " --max-new-tokens 200
    memopt convert runs/demo/params.safetensors gpt2-dir --to gpt2 --dtype fp32
    memopt verify runs/demo

SIGTERM (schedulers, ``docker stop``) is handled as Ctrl-C: a checkpoint, then exit code 143 (130
for Ctrl-C). ``FUNCTIONAL_MEMOPT_FAULT`` injects faults at named write phases (see ``faults``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import torch

from ..data.batch import rows_per_microbatch
from ..model.config import PRESETS
from ..parallel.process_group import RankFailed, init_distributed, shutdown_distributed
from .commands import convert_command, sample_command
from .faults import install_fault_hook
from .loop import train
from .memory_report import add_memory_arguments, memory_command
from .records import parse_run_config
from .run import CPU_DEFAULT_POLICY, FLAGS, TrainArgs, choose_threads, resolve_args, resolve_device
from .run_dir import read_run_config
from .verify import verify_command

__all__ = ["main", "build_parser"]

# May change on --resume (a checkpoint holds the single-process layout, so the ranks and stage may too).
_RESUMABLE = {"steps", "stop_at", "device", "threads", "gc_every", "eval_interval", "zero_stage", "dist_timeout"}


class _UsageError(Exception):
    """A command-line mistake found by argparse."""


class _Silent(Exception):
    """An error that rank 0 reports for every rank (the same on all of them): exit quietly."""


def _launched_world_size() -> int:
    """The ranks torchrun started (WORLD_SIZE), known before joining them; 1 without torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ValueError("train: WORLD_SIZE must be an integer; launch with torchrun, which sets it.") from None


@contextlib.contextmanager
def _reported_by_rank_0():
    """Errors in here are the same on every rank (arguments, config): only rank 0 prints one."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        if os.environ.get("RANK", "0") != "0":
            raise _Silent() from err
        raise


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: main prints it
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainArgs()
    S = argparse.SUPPRESS  # only flags given on the command line land in the namespace

    def add(flag, help, **kw):
        p.add_argument(flag, default=S, help=help, **kw)

    presets = "; ".join(f"{name} ({c.n_layer} layers, width {c.n_embd}, vocab {c.vocab_size}, block {c.block_size})"
                        for name, c in PRESETS.items())
    add("--preset", f"model preset (default {d.preset}): {presets}", metavar="NAME")
    for name in ("n-layer", "n-head", "n-embd", "block-size"):
        add(f"--{name}", "override the preset's " + name.replace("-", "_"), type=_positive_int)
    add("--policy", "precision policy: auto, fp32, mixed_bf16, mixed_fp16, bf16, fp16 or "
        "'params=..,compute=..,output=..' (default auto: mixed_bf16 on CUDA when supported, else "
        f"mixed_fp16; {CPU_DEFAULT_POLICY} on the CPU)")
    add("--loss-scale", "auto (dynamic for fp16 compute), none, dynamic, or a static scale such as 1024")
    add("--batch-size", f"rows per optimizer step, over all ranks (default {d.batch_size})", type=_positive_int)
    add("--accum-steps", "micro-batches per step and rank; must divide the rank's rows (default 4, else 2 or 1)",
        type=_positive_int)
    add("--seq-len", "tokens per row (default: the block size)", type=_positive_int)
    add("--remat", "rematerialise blocks: none, all, or N for every N-th block (default none)")
    add("--loss-chunk", "tokens per chunk of the output head and loss, so the logits are never whole: auto (the "
        "memory ledger's choice), none, N, or cce (the cut-cross-entropy package's fused kernels: CUDA, mixed "
        "precision, not compiled) (default auto)")
    add("--compile", "torch.compile the differentiated loss: auto (on CUDA, and for bf16 runs of at least 1000 steps "
        "on the CPU), on or off (default auto)",
        choices=["auto", "on", "off"])
    add("--lr", f"peak learning rate (default {d.lr:g})", type=float)
    add("--min-lr", "final learning rate of the cosine schedule (default lr / 10)", type=float)
    add("--warmup-steps", "linear warmup steps (default steps / 8, at most 100)", type=int)
    add("--schedule", "learning-rate schedule after warmup (default cosine)", choices=["cosine", "constant"])
    add("--weight-decay", f"AdamW weight decay on matrices (default {d.weight_decay:g})", type=float)
    add("--beta1", f"AdamW b1 (default {d.beta1:g})", type=float)
    add("--beta2", f"AdamW b2 (default {d.beta2:g})", type=float)
    add("--max-grad-norm", f"clip the global gradient norm, 0 for off (default {d.max_grad_norm:g})", type=float)
    add("--steps", f"optimizer steps in the run (default {d.steps}); on --resume a new value extends (or "
        "shortens) the run, and the cosine schedule then spans the new number (said, and kept in config.json)",
        type=_positive_int)
    add("--stop-at", "stop with a checkpoint at this step, keeping the schedule of --steps", type=_positive_int)
    add("--eval-interval", "steps between evaluations and checkpoints (default steps / 6)", type=_positive_int)
    add("--eval-batches", f"validation batches per evaluation (default {d.eval_batches})", type=_positive_int)
    add("--corpus", "a text file or folder to train on (default: the built-in corpus)")
    add("--run-dir", "where the run is written (default runs/<preset>-<time>)")
    add("--seed", f"seed of the init and the batch order (default {d.seed})", type=int)
    add("--device", "auto, cpu, cuda or cuda:N (default auto: CUDA when available); under torchrun each rank "
        "takes cuda:LOCAL_RANK, or the CPU with --device cpu")
    add("--threads", "CPU threads: auto (the cores not busy now) or a number")
    add("--gc-every", "memory hygiene (garbage collection, cache clearing) every N steps (default off)", type=int)
    add("--zero-stage", "under torchrun: 0 replicates the optimizer state on every rank, 1 shards it, 2 shards "
        "the gradients too (default 0)", type=int, choices=[0, 1, 2])
    add("--dist-timeout", f"under torchrun: seconds before a missing rank or a stuck collective is an error "
        f"(default {d.dist_timeout:g})", type=_seconds)
    add("--resume", "continue the run in this directory exactly where its checkpoint left off", metavar="RUN_DIR")
    p.add_argument("--force", action="store_true", help="replace a previous run in --run-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_command)


def _add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run directory, a params .safetensors file or a Hugging Face GPT-2 directory")
    p.add_argument("--prompt", default=None, help="prompt text for byte-level models (default: a newline)")
    p.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids, e.g. 464,3290")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=sample_command)


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a params .safetensors file, a run directory or a Hugging Face GPT-2 directory")
    p.add_argument("output", help="the params file (or GPT-2 directory with --to gpt2) to write")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="stored dtype (default fp16)")
    p.add_argument("--to", default="params", choices=["params", "gpt2"], help="output format (default params)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=convert_command)


def _add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory to check")
    p.set_defaults(func=verify_command)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; the ``memory`` subcommand's options are added only when it is the command."""
    parser = _Parser(prog="memopt", description="Train, sample and convert memory-efficient transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_train_arguments(sub.add_parser("train", help="train a model (by default the tiny preset, built-in corpus)"))
    _add_sample_arguments(sub.add_parser("sample", help="generate text from a trained model"))
    _add_convert_arguments(sub.add_parser("convert", help="convert params files and GPT-2 directories"))
    _add_verify_arguments(sub.add_parser("verify", help="check every file of a run directory; exit 1 on any damage"))
    mem = sub.add_parser("memory", help="memory ledger: predicted vs measured bytes, and memory hygiene")
    if argv is not None and argv[:1] == ["memory"]:
        add_memory_arguments(mem)
        mem.set_defaults(func=lambda ns: int(memory_command(ns) or 0))
    return parser


# ----------------------------------------------------------------------------- train


def _train_setup(ns: argparse.Namespace, world_size: int):
    """``(args, cfg, resolved, run_dir, record)`` from the command line (and config.json on --resume, whose
    parsed record is returned; None for a new run)."""
    given = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(TrainArgs)}}
    run_dir = getattr(ns, "run_dir", None)
    resuming = getattr(ns, "resume", None) is not None
    record = None
    if resuming:
        if run_dir is not None and os.path.abspath(run_dir) != os.path.abspath(ns.resume):
            raise ValueError("train: give the run directory once, with --resume RUN_DIR (not also --run-dir).")
        run_dir = ns.resume
        record = read_run_config(run_dir)
        fixed = sorted(set(given) - _RESUMABLE)
        if fixed:
            flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
            free = ", ".join("--" + k.replace("_", "-") for k in sorted(_RESUMABLE))
            raise ValueError(
                f"train: {flags} cannot change when resuming (the run's values are in {run_dir}/config.json); "
                f"only {free} can. Start a new run instead."
            )
        stored_args, stored, cfg = parse_run_config(record, run_dir)
        # --stop-at belongs to one session: a resumed run goes on to --steps unless told again.
        args = dataclasses.replace(stored_args, **{"stop_at": None, **given})
        _, fresh = resolve_args(args, resolve_device(args.device), world_size)  # validates the new values
        rows_per_microbatch(args.batch_size, stored.accum_steps, world_size, caller="train", names=FLAGS)  # other ranks too
        resolved = stored._replace(
            eval_interval=args.eval_interval or stored.eval_interval,
            threads=fresh.threads if "threads" in given else stored.threads,  # same threads, same bits
        )
    else:
        if given.get("corpus") is not None:  # so that --resume finds it from any folder
            given["corpus"] = os.path.abspath(given["corpus"])
        args = TrainArgs(**given)
        cfg, resolved = resolve_args(args, resolve_device(args.device), world_size)
        run_dir = run_dir or os.path.join("runs", f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args, cfg, resolved, run_dir, record


def _train_command(ns: argparse.Namespace) -> int:
    with _reported_by_rank_0():  # the same arguments on every rank: the same errors
        args, cfg, resolved, run_dir, record = _train_setup(ns, _launched_world_size())
        device = resolve_device(args.device)
    resuming = record is not None
    # Without torchrun's environment this is one process on `device`; under torchrun each rank
    # takes cuda:LOCAL_RANK (NCCL), or the CPU (gloo) when CUDA is absent or --device cpu asks.
    info = init_distributed(backend="gloo" if device.type == "cpu" else None, timeout_s=args.dist_timeout)
    try:
        if info.world_size == 1:
            info = info._replace(device=device)
        torch.set_num_threads(resolved.threads)
        header = None
        if not ns.quiet and info.device.type == "cpu":
            why = ("recorded in config.json, so a resume gives the same bits" if resuming and "threads" not in vars(ns)
                   else choose_threads(args.threads)[1])
            header = f"memopt: {resolved.threads} CPU thread(s) ({why})"
        result = train(args, cfg, resolved, run_dir, info.device, resume=resuming, force=ns.force, quiet=ns.quiet,
                       info=info, config=record, header=header)
    finally:
        shutdown_distributed()
    if info.rank == 0:
        print(result.message, file=sys.stderr if result.exit_code else sys.stdout)
    return result.exit_code


# ----------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _error(text: str) -> None:
    """One error line on stderr; under torchrun, ranks other than 0 say which they are."""
    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(f"memopt: error: {f'rank {rank}: ' if rank != '0' and size != '1' else ''}{text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the ``memopt`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        install_fault_hook(os.environ.get("FUNCTIONAL_MEMOPT_FAULT"))
        ns = build_parser(argv).parse_args(argv)
        return ns.func(ns)
    except _UsageError as err:
        if os.environ.get("RANK", "0") == "0":  # every rank parses the same command line
            _error(_one_line(err))
        return 2
    except (_Silent, RankFailed):  # rank 0 printed why
        return 2
    except torch.OutOfMemoryError as err:
        _error(f"out of memory ({_one_line(err)[:200]}); lower --batch-size, raise --accum-steps or pass --remat all.")
        return 1
    except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as err:
        _error(_one_line(err))
        return 2
    except KeyboardInterrupt:
        print("memopt: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
