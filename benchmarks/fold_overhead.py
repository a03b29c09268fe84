"""The Python work per micro-batch at accumulation 8: a cast of each block's params, or one cast at entry.

Run:
    python benchmarks/fold_overhead.py [--reps 22] [--preset tiny]

Under a policy whose compute dtype is the params' dtype (fp32), the step now skips the
just-in-time cast of each block's params (a tree walk per block and micro-batch that casts
nothing) and lets the policy's single cast at entry pass the params through. This times the two
routes interleaved in one process (user CPU time, one thread, fp32, batch 8 x 128 as 8 micro-batches
of one row, AdamW, clipping): the old route is the same step built with
``loss_fn=make_loss_fn(cfg, compute_dtype=torch.float32)``. ``benchmarks/run.py``'s diagnostics
section profiles the whole a8 step (``profile_a8``) that pointed at it.
"""

import argparse
import statistics
import time

import torch

import functional_memopt as fm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--reps", type=int, default=22)
parser.add_argument("--preset", default="tiny")
args = parser.parse_args()
torch.set_num_threads(1)
cfg = fm.get_config(args.preset)
opt = fm.adamw(1e-4)
batch = fm.sample_batch(fm.load_corpus(), 8, 128, seed=0, index=0)
steps = {
    "one cast at entry": fm.make_train_step(cfg, opt, accum_steps=8, max_grad_norm=1.0),
    "a cast per block": fm.make_train_step(cfg, opt, accum_steps=8, max_grad_norm=1.0,
                                           loss_fn=fm.make_loss_fn(cfg, compute_dtype=torch.float32)),
}
states = {k: fm.init_train_state(fm.init_params(cfg), opt) for k in steps}
times = {k: [] for k in steps}
for r in range(args.reps + 3):
    for k, step in steps.items():
        t0 = time.process_time()
        states[k], m = step(states[k], batch)
        float(m["loss"])
        if r >= 3:
            times[k].append(time.process_time() - t0)
new, old = (statistics.median(v) for v in times.values())
paired = statistics.median(a / b for a, b in zip(*times.values()))
print(f"{args.preset} fp32, batch 8 x 128 as 8 micro-batches: one cast at entry {new * 1e3:.1f} ms, a cast per block "
      f"{old * 1e3:.1f} ms; ratio {new / old:.3f} (median of per-round ratios {paired:.3f}, {args.reps} rounds)")
