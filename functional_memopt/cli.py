"""The ``memopt`` command: ``train``, ``sample``, ``convert`` and ``memory``.

Run ``memopt train`` with no arguments to train the ``tiny`` preset on the built-in corpus with the
memory techniques that pay on this device; every knob is a flag (``memopt train --help``). Bad
input ends with one line ``memopt: error: ...`` on stderr and exit code 2, never a traceback.

Example:
    memopt train --steps 300 --run-dir runs/demo
    memopt sample runs/demo --prompt "def " --max-new-tokens 200
    memopt convert runs/demo/params.safetensors gpt2-dir --to gpt2 --dtype fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from ._config import ModelConfig, get_config
from ._loop import Resolved, TrainArgs, read_run_config, train
from ._precision import get_policy

__all__ = ["main", "build_parser", "CPU_DEFAULT_POLICY"]

# On the CPU "auto" takes the policy measured fastest for the tiny preset (batch 32 = 4 x 8,
# sequence 128) on a 2-core AVX-512 machine with bf16 instructions; without bf16 instructions
# bf16 matmuls are emulated, so fp32 is taken there.
CPU_DEFAULT_POLICY = "mixed_bf16"
_RESUMABLE = {"steps", "stop_at", "device", "threads", "gc_every", "eval_interval"}  # may change on --resume


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _UsageError(Exception):
    """A command-line mistake found by argparse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: main prints it
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainArgs()
    S = argparse.SUPPRESS  # only flags given on the command line land in the namespace

    def add(flag, help, **kw):
        p.add_argument(flag, default=S, help=help, **kw)

    add("--preset", f"model preset (default {d.preset}); see functional_memopt.PRESETS")
    for name in ("n-layer", "n-head", "n-embd", "block-size"):
        add(f"--{name}", "override the preset's " + name.replace("-", "_"), type=_positive_int)
    add("--policy", "precision policy: auto, fp32, mixed_bf16, mixed_fp16, bf16, fp16 or "
        "'params=..,compute=..,output=..' (default auto: mixed_bf16 on CUDA when supported, else "
        f"mixed_fp16; {CPU_DEFAULT_POLICY} on the CPU)")
    add("--loss-scale", "auto (dynamic for fp16 compute), none, dynamic, or a static scale such as 1024")
    add("--batch-size", f"rows per optimizer step (default {d.batch_size})", type=_positive_int)
    add("--accum-steps", "micro-batches per step; must divide the batch (default 4, else 2 or 1)", type=_positive_int)
    add("--seq-len", "tokens per row (default: the block size)", type=_positive_int)
    add("--remat", "rematerialise blocks: none, all, or N for every N-th block (default none)")
    add("--lr", f"peak learning rate (default {d.lr:g})", type=float)
    add("--min-lr", "final learning rate of the cosine schedule (default lr / 10)", type=float)
    add("--warmup-steps", "linear warmup steps (default steps / 8, at most 100)", type=int)
    add("--schedule", "learning-rate schedule after warmup (default cosine)", choices=["cosine", "constant"])
    add("--weight-decay", f"AdamW weight decay on matrices (default {d.weight_decay:g})", type=float)
    add("--beta1", f"AdamW b1 (default {d.beta1:g})", type=float)
    add("--beta2", f"AdamW b2 (default {d.beta2:g})", type=float)
    add("--max-grad-norm", f"clip the global gradient norm, 0 for off (default {d.max_grad_norm:g})", type=float)
    add("--steps", f"optimizer steps in the run (default {d.steps})", type=_positive_int)
    add("--stop-at", "stop with a checkpoint at this step, keeping the schedule of --steps", type=_positive_int)
    add("--eval-interval", "steps between evaluations and checkpoints (default steps / 6)", type=_positive_int)
    add("--eval-batches", f"validation batches per evaluation (default {d.eval_batches})", type=_positive_int)
    add("--corpus", "a text file or folder to train on (default: the built-in corpus)")
    add("--run-dir", "where the run is written (default runs/<preset>-<time>)")
    add("--seed", f"seed of the init and the batch order (default {d.seed})", type=int)
    add("--device", "auto, cpu, cuda or cuda:N (default auto: CUDA when available)")
    add("--threads", "CPU threads: auto (the cores not busy now) or a number")
    add("--gc-every", "memory hygiene (garbage collection, cache clearing) every N steps (default off)", type=int)
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
    p.set_defaults(func=_sample_command)


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a params .safetensors file, a run directory or a Hugging Face GPT-2 directory")
    p.add_argument("output", help="the params file (or GPT-2 directory with --to gpt2) to write")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="stored dtype (default fp16)")
    p.add_argument("--to", default="params", choices=["params", "gpt2"], help="output format (default params)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=_convert_command)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; the ``memory`` subcommand's options load only when it is the command."""
    parser = _Parser(prog="memopt", description="Train, sample and convert memory-efficient transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_train_arguments(sub.add_parser("train", help="train a model (by default the tiny preset, built-in corpus)"))
    _add_sample_arguments(sub.add_parser("sample", help="generate text from a trained model"))
    _add_convert_arguments(sub.add_parser("convert", help="convert params files and GPT-2 directories"))
    mem = sub.add_parser("memory", help="memory ledger: predicted vs measured bytes, and memory hygiene")
    if argv is not None and argv[:1] == ["memory"]:
        try:
            from ._memory import add_memory_arguments, memory_command
        except ImportError as err:
            raise ValueError(f"memory: the memory ledger is not available in this installation ({err}).") from None
        add_memory_arguments(mem)
        mem.set_defaults(func=lambda ns: int(memory_command(ns) or 0))
    return parser


# ----------------------------------------------------------------------------- train


def _device(spec: str) -> torch.device:
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


def _threads(spec: str) -> int:
    if spec != "auto":
        if not spec.isdigit() or int(spec) < 1:
            raise ValueError(f"train: --threads must be auto or an integer >= 1, got {spec!r}.")
        return int(spec)
    cores = torch.get_num_threads()
    try:  # threads beyond the idle cores spin against other processes (measured 7x slower)
        busy = int(os.getloadavg()[0])
    except (OSError, AttributeError):
        busy = 0
    return max(1, min(cores, (os.cpu_count() or cores) - busy))


def _resolve(args: TrainArgs, device: torch.device):
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k)}
    cfg = get_config(args.preset, **overrides)
    policy = args.policy
    if policy == "auto":
        if device.type == "cuda":
            policy = "mixed_bf16" if torch.cuda.is_bf16_supported() else "mixed_fp16"
        else:
            policy = CPU_DEFAULT_POLICY if _cpu_has_bf16() else "fp32"
    pol = get_policy(policy)  # raises for a string it cannot read
    loss_scale = args.loss_scale
    if loss_scale == "auto":
        loss_scale = "dynamic" if pol.compute_dtype == torch.float16 else "none"
    elif loss_scale not in ("none", "dynamic"):
        try:
            value = float(loss_scale)
        except ValueError:
            value = float("nan")
        if not (0 < value < float("inf")):
            raise ValueError(f"train: --loss-scale must be auto, none, dynamic or a number > 0, got {loss_scale!r}.")
    fitting = next(k for k in (4, 2, 1) if args.batch_size % k == 0)
    accum = args.accum_steps or fitting
    if args.batch_size % accum:
        raise ValueError(
            f"train: --accum-steps {accum} does not divide --batch-size {args.batch_size}; choose a divisor "
            f"so every micro-batch has the same rows (e.g. --accum-steps {fitting})."
        )
    seq_len = args.seq_len or cfg.block_size
    if seq_len > cfg.block_size:
        raise ValueError(
            f"train: --seq-len {seq_len} exceeds the block size {cfg.block_size}; lower it or raise --block-size."
        )
    if args.remat not in ("none", "all") and not (args.remat.isdigit() and int(args.remat) >= 1):
        raise ValueError(
            f"train: --remat must be none, all or an integer N >= 1 (every N-th block), got {args.remat!r}."
        )
    warmup = min(100, args.steps // 8) if args.warmup_steps is None else args.warmup_steps
    if warmup < 0 or warmup > args.steps:
        raise ValueError(f"train: --warmup-steps must be between 0 and --steps ({args.steps}), got {warmup}.")
    if args.gc_every < 0:
        raise ValueError(f"train: --gc-every must be >= 0, got {args.gc_every}.")
    if args.max_grad_norm < 0:
        raise ValueError(f"train: --max-grad-norm must be >= 0 (0 turns clipping off), got {args.max_grad_norm}.")
    interval = args.eval_interval or max(1, args.steps // 6)
    return cfg, Resolved(policy, loss_scale, accum, seq_len, warmup, interval, _threads(args.threads))


def _train_command(ns: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(TrainArgs)}}
    run_dir = getattr(ns, "run_dir", None)
    resuming = getattr(ns, "resume", None) is not None
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
        try:
            # --stop-at belongs to one session: a resumed run goes on to --steps unless told again.
            args = dataclasses.replace(TrainArgs(**record["train"]), **{"stop_at": None, **given})
            stored = Resolved(**record["resolved"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"train: {run_dir}/config.json is damaged ({err}).") from None
        device = _device(args.device)
        _, fresh = _resolve(args, device)  # validates the new values
        cfg = ModelConfig.from_dict(record["model"])
        resolved = stored._replace(
            eval_interval=args.eval_interval or stored.eval_interval,
            threads=fresh.threads if "threads" in given else stored.threads,  # same threads, same bits
        )
    else:
        if given.get("corpus") is not None:  # so that --resume finds it from any folder
            given["corpus"] = os.path.abspath(given["corpus"])
        args = TrainArgs(**given)
        device = _device(args.device)
        cfg, resolved = _resolve(args, device)
        run_dir = run_dir or os.path.join("runs", f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    torch.set_num_threads(resolved.threads)
    result = train(args, cfg, resolved, run_dir, device, resume=resuming, force=ns.force, quiet=ns.quiet)
    if result.status == "interrupted":
        print(result.message, file=sys.stderr)
        return 130
    if result.status == "diverged":
        print(result.message, file=sys.stderr)
        return 1
    print(result.message)
    return 0


# ----------------------------------------------------------------------------- sample and convert


def _load_model(source: str, device, *, caller: str):
    """(params, cfg, paths read) from a run directory, a params file or a GPT-2 directory."""
    from ._checkpoint import checkpoint_info, has_checkpoint, load_checkpoint_params
    from ._gpt2 import load_gpt2
    from ._storage import load_params

    if os.path.isdir(source):
        params_file = os.path.join(source, "params.safetensors")
        if os.path.isfile(params_file):
            return (*load_params(params_file, device=device), [params_file])
        if has_checkpoint(source):
            tensors = os.path.join(source, checkpoint_info(source)["tensors"])
            return (*load_checkpoint_params(source, device=device), [tensors])
        if os.path.isfile(os.path.join(source, "config.json")):
            params, cfg = load_gpt2(source, device=device)
            paths = [os.path.join(source, f) for f in os.listdir(source) if f.endswith((".safetensors", ".json"))]
            return params, cfg, paths
        raise ValueError(
            f"{caller}: {source!r} holds no params.safetensors, checkpoint or Hugging Face GPT-2 model "
            "(config.json + model.safetensors)."
        )
    if os.path.isfile(source):
        return (*load_params(source, device=device), [source])
    raise FileNotFoundError(f"{caller}: no file or directory at {source!r}; check the path.")


def _size(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def _sample_command(ns: argparse.Namespace) -> int:
    from ._data import decode, encode
    from ._sample import generate

    device = _device(ns.device)
    params, cfg, _ = _load_model(ns.source, device, caller="sample")
    if ns.prompt is not None and ns.prompt_ids is not None:
        raise ValueError("sample: give --prompt or --prompt-ids, not both.")
    if ns.prompt_ids is not None:
        try:
            ids = [int(x) for x in ns.prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ValueError(f"sample: --prompt-ids must be comma-separated integers, got {ns.prompt_ids!r}.") from None
    elif cfg.vocab_size != 256:
        raise ValueError(
            f"sample: this model's vocabulary has {cfg.vocab_size} tokens, not bytes, so text cannot be encoded "
            "here; give the prompt as token ids with --prompt-ids 464,3290 (ids are printed back)."
        )
    else:
        ids = encode(ns.prompt if ns.prompt is not None else "\n").tolist()
    out = generate(params, cfg, ids, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                   top_k=ns.top_k, seed=ns.seed)
    if cfg.vocab_size == 256:
        sys.stdout.write(decode(out) + "\n")
    else:
        print(",".join(str(i) for i in out.tolist()))
    return 0


def _convert_command(ns: argparse.Namespace) -> int:
    from ._gpt2 import save_gpt2
    from ._storage import save_params

    if os.path.exists(ns.output) and not ns.force:
        raise ValueError(
            f"convert: {ns.output!r} already exists; pass --force to replace it, or choose another output."
        )
    if os.path.abspath(ns.input) == os.path.abspath(ns.output):
        raise ValueError("convert: the output must differ from the input.")
    params, cfg, read = _load_model(ns.input, "cpu", caller="convert")
    if ns.to == "gpt2":
        save_gpt2(ns.output, params, cfg, dtype=ns.dtype, overwrite=ns.force)
        written = [os.path.join(ns.output, f) for f in ("model.safetensors", "config.json")]
    else:
        save_params(ns.output, params, cfg, dtype=ns.dtype)
        written = [ns.output]
    print(f"memopt: converted {ns.input} ({_human(_size(read))}) -> {ns.output} ({_human(_size(written))}, {ns.dtype})")
    return 0


# ----------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``memopt`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser(argv).parse_args(argv)
        return ns.func(ns)
    except _UsageError as err:
        print(f"memopt: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as err:
        print(f"memopt: error: out of memory ({_one_line(err)[:200]}); lower --batch-size, raise --accum-steps "
              "or pass --remat all.", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as err:
        print(f"memopt: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memopt: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
