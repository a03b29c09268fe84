"""The fixed cost of a step: the functional step and the reference on a model too small to compute.

Run:
    python benchmarks/step_overhead.py [--reps 80]

At width 16 and a batch of 8 x 8 tokens (fp32, 4 blocks, AdamW, clipping at 1.0, accumulation 1)
the kernels take microseconds, so a step's time is mostly the Python and dispatch around them:
tree walks, casts, the optimizer's per-leaf calls. The three runners (functional pure, functional
donated, the imperative reference) are timed interleaved, one thread, user CPU time, median of
``--reps`` rounds after three untimed ones; what the functional step spends over the reference is
its own overhead per step, which ``benchmarks/run.py``'s step-time rows carry on the real models.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import functional_memopt as fm  # noqa: E402
from harness.runners import Variant, make_runner  # noqa: E402
from harness.timing import interleave  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = fm.get_config("tiny", n_embd=16, n_head=4)
    batch = fm.sample_batch(fm.load_corpus(), 8, 8, seed=0, index=0)
    params = fm.init_params(cfg, seed=0)
    runners = {
        "functional": make_runner(cfg, params, batch, Variant(precision="fp32")),
        "functional, donated": make_runner(cfg, params, batch, Variant(precision="fp32", donate=True)),
        "reference": make_runner(cfg, params, batch, Variant(kind="ref", precision="fp32")),
    }
    t = interleave(runners, warmup=3, reps=args.reps, device=torch.device("cpu"), clock="user")
    ref = t["reference"]["s"]
    for name, v in t.items():
        print(f"{name}: {v['s'] * 1e3:.2f} ms per step, {(v['s'] - ref) * 1e3:+.2f} ms against the reference")


if __name__ == "__main__":
    main()
