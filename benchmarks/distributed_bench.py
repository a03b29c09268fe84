"""Per-rank optimizer-state bytes, peak memory and time per step of data parallel / ZeRO on CPU ranks.

Run:
    python benchmarks/distributed_bench.py --out benchmarks/out/distributed.json [--ranks 1 2 4] [--steps 5]

Each configuration (world size N, ZeRO stage) runs under ``torchrun --nproc_per_node=N`` with gloo
on this machine, one thread per rank; the baseline is ``fm.make_train_step`` in one plain process.
Every run trains the same model on the same global batch (each rank takes B/N rows). Reported per
configuration: optimizer-state bytes on one rank (bytes of its tensors), peak RSS of the largest rank
and its growth over the RSS measured after imports (the torch runtime alone is some 250 MB), and
the median time per step (after one warm-up step). Steps donate their state, as ``memopt train``
does. With more ranks than cores the ranks share
cores, so times show the cost of the collectives and of oversubscription, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import functional_memopt as fm
from harness.trees import tree_bytes  # benchmarks/ is on sys.path: this script's folder


def rss_mb() -> float:
    """Current resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    torch.set_num_threads(1)
    base_rss = rss_mb()
    cfg = fm.ModelConfig(vocab_size=256, block_size=args.seq, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd)
    opt = fm.adamw(3e-4, weight_decay=0.1, mask=fm.decay_mask)
    data = fm.load_corpus()
    if args.stage < 0:  # the single-process baseline
        rank, size = 0, 1
        state = fm.init_train_state(fm.init_params(cfg), opt)
        step = fm.make_train_step(cfg, opt, max_grad_norm=1.0, donate=True)
    else:
        info = fm.init_distributed(timeout_s=120)
        rank, size = info.rank, info.world_size
        par = fm.data_parallel(zero_stage=args.stage)
        state = fm.init_train_state(fm.init_params(cfg), opt, parallel=par)
        step = fm.make_train_step(cfg, opt, parallel=par, max_grad_norm=1.0, donate=True)
    times = []
    for i in range(args.steps + 1):
        batch = fm.shard_batch(fm.sample_batch(data, args.batch, args.seq, seed=0, index=i), rank, size)
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    result = {
        "rank": rank,
        "world_size": size,
        "opt_state_bytes": tree_bytes(state.opt_state),
        "params_bytes": tree_bytes(state.params),
        "peak_rss_mb": peak_rss_mb(),
        "rss_growth_mb": peak_rss_mb() - base_rss,
        "step_s": statistics.median(times[1:]),
        "loss": float(metrics["loss"]),
    }
    with open(os.path.join(args.worker_out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if args.stage >= 0:
        fm.shutdown_distributed()


def run(args, n: int, stage: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        me = [os.path.abspath(__file__), "--worker-out", out, "--stage", str(stage), "--steps", str(args.steps),
              "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--batch", str(args.batch), "--seq", str(args.seq)]
        if stage < 0:
            cmd = [sys.executable] + me
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(29400 + n * 10 + stage)] + me
        # A fixed mmap threshold returns every large freed tensor to the system at once, so peak RSS
        # follows the live tensors instead of what glibc's heap keeps cached (its dynamic threshold
        # otherwise hides differences of tens of MB).
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        ranks = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))]
    return {
        "world_size": n,
        "zero_stage": stage if stage >= 0 else None,
        "opt_state_bytes_per_rank": max(r["opt_state_bytes"] for r in ranks),
        "params_bytes": ranks[0]["params_bytes"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "rss_growth_mb": max(r["rss_growth_mb"] for r in ranks),
        "step_s": max(r["step_s"] for r in ranks),
        "loss": ranks[0]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch rows (divisible by every world size)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)
    rows = [run(args, 1, -1)] + [run(args, n, z) for n in args.ranks for z in args.stages]
    n_params = rows[0]["params_bytes"] // 4
    print(f"model: {n_params / 1e6:.2f} M params, adamw; global batch {args.batch} x {args.seq}; "
          f"{os.cpu_count()} CPUs, {torch.__version__}")
    print("| ranks | ZeRO | opt state / rank (MB) | peak RSS (MB) | RSS growth (MB) | s / step | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        zero = "single process" if r["zero_stage"] is None else str(r["zero_stage"])
        print(f"| {r['world_size']} | {zero} | {r['opt_state_bytes_per_rank'] / 1e6:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['rss_growth_mb']:.0f} | {r['step_s']:.3f} | {r['loss']:.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "args": {k: v for k, v in vars(args).items() if k not in ("stage", "worker_out", "out")},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
