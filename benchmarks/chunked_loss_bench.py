"""What the chunked loss costs in step time: the same step with and without ``loss_chunk``, interleaved.

Run:
    python benchmarks/chunked_loss_bench.py [--repeats 7] [--policy mixed_bf16] [--out benchmarks/out/chunked_loss.json]

For the tiny and small presets (mixed bf16, the default run's shapes) and GPT-2 at the micro-batch
of the floor's shape (8 x 1024 in 4 micro-batches: 2 x 1024 tokens), one process builds both steps
on the same state and batch and times them alternately (user-mode CPU time per optimizer step, one
thread, median of ``--repeats`` after a warm-up), so a busy machine slows both alike. Kernel time,
mostly page faults of freshly mapped heap, is recorded apart (``sys``), as benchmarks/run.py does.
The ratio chunked / plain is the cost (and the median of the per-round ratios, ``paired``); the
chunk is the ledger's choice. GPT-2 at 2 x 128 is shown too, without a target: with 256 tokens
the plain logits are small and the chunked loss's second pass over the head's gradient is the
whole difference.
On a CPU without bf16 instructions, bf16 matmuls are emulated and ten times slower than fp32:
``--policy fp32`` then measures the same loss in minutes instead of an hour.
"""

import argparse
import json
import os
import resource
import statistics

import torch

import functional_memopt as fm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--policy", default="mixed_bf16", help="precision policy (default mixed_bf16)")
parser.add_argument("--out", default=os.path.join("benchmarks", "out", "chunked_loss.json"))
args = parser.parse_args()
torch.set_num_threads(1)

CASES = [  # preset, rows, sequence, micro-batches, remat, target (chunked / plain at most)
    ("tiny", 32, 128, 4, None, 1.05),
    ("small", 16, 256, 4, None, 1.05),
    ("gpt2", 2, 128, 1, "all", None),
    ("gpt2", 2, 1024, 1, "all", 1.02),
]
results = []
data = fm.load_corpus()
for preset, rows, seq, accum, remat, target in CASES:
    cfg = fm.get_config(preset)
    chunk = fm.ablation(cfg, rows, seq, accum_steps=accum)[-1][1].settings.loss_chunk
    opt = fm.adamw(1e-4)
    batch = fm.sample_batch(data, rows, seq, seed=0, index=0)
    state = fm.init_train_state(fm.init_params(cfg), opt, policy=args.policy)
    steps = {name: fm.make_train_step(cfg, opt, policy=args.policy, accum_steps=accum, remat=remat, loss_chunk=c)
             for name, c in (("plain", None), ("chunked", chunk))}
    times, kernel = {name: [] for name in steps}, {name: [] for name in steps}
    for i in range(args.repeats + 1):
        for name, step in steps.items():
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            _, m = step(state, batch)
            float(m["loss"])
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            if i:  # the first round warms both up
                times[name].append(u1.ru_utime - u0.ru_utime)
                kernel[name].append(u1.ru_stime - u0.ru_stime)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["chunked"] / med["plain"]
    paired = statistics.median(c / p for c, p in zip(times["chunked"], times["plain"]))
    results.append({"preset": preset, "rows": rows, "seq": seq, "accum": accum, "remat": remat, "chunk": chunk,
                    "plain_s": med["plain"], "chunked_s": med["chunked"], "ratio": ratio, "paired_ratio": paired,
                    "target": target, "plain_sys_s": statistics.median(kernel["plain"]),
                    "chunked_sys_s": statistics.median(kernel["chunked"])})
    print(f"{preset:>6} {rows} x {seq}, {accum} micro-batches, chunk {chunk}: plain {med['plain'] * 1e3:8.1f} ms, "
          f"chunked {med['chunked'] * 1e3:8.1f} ms, ratio {ratio:.3f} (paired {paired:.3f})", flush=True)
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    json.dump({"results": results, "repeats": args.repeats, "policy": args.policy, "torch": torch.__version__}, f,
              indent=1)
print(f"wrote {args.out}")
