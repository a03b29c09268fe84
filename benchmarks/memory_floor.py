"""How close each technique brings a GPT-2-shaped step to the optimizer-state floor: predicted and measured.

Run:
    python benchmarks/memory_floor.py [--preset gpt2] [--batch-size 2] [--seq-len 256] [--accum-steps 2]
                                      [--out benchmarks/out/memory_floor.json] [--chart benchmarks/memory_floor.png]

For each row of the ledger's ablation (the fp32 untied baseline, each technique alone, and all of
them together, as ``memopt train`` runs them: donated updates and the chunked loss), it predicts
the peak with ``fm.predict_memory`` and measures the live tensor peak of real training steps with
``fm.measure_memory`` (a fresh process per row, the tensor tracker). It prints the table, each
measured/predicted ratio, the distance to the floor (params + AdamW moments + one float32
gradient: 16 bytes per parameter), and the prediction for GPT-2 at 8 x 1024 with 4 micro-batches,
the shape the floor target is set at. Measuring GPT-2 on 2 CPU cores takes a few minutes.
"""

import argparse
import json
import os
import time

import torch

import functional_memopt as fm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="gpt2")
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--accum-steps", type=int, default=2)
parser.add_argument("--steps", type=int, default=1, help="training steps before the measured one")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", default=os.path.join("benchmarks", "out", "memory_floor.json"))
parser.add_argument("--chart", default=None, help="also write a PNG chart (needs matplotlib)")
args = parser.parse_args()
torch.set_num_threads(args.threads)

MiB = 2**20
cfg = fm.get_config(args.preset)
t0 = time.perf_counter()
rows = []
print(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, {args.accum_steps} micro-batches, measured with the "
      "tensor tracker (one fresh process per row)")
print(f"{'technique':>18}  {'predicted':>9}  {'measured':>9}  {'meas/pred':>9}  {'pred/floor':>10}  peak at")
for name, pred in fm.ablation(cfg, args.batch_size, args.seq_len, policy="mixed_bf16", accum_steps=args.accum_steps,
                              remat="all"):
    got = fm.measure_memory(cfg, batch_size=args.batch_size, seq_len=args.seq_len, settings=pred.settings,
                            steps=args.steps, timeout=3600)
    ratio = got.peak_bytes / pred.total
    rows.append({"name": name, "settings": pred.settings._asdict(), "predicted": pred.total, "phase": pred.phase,
                 "peak": pred.peak, "floor": pred.floor, "measured": got.peak_bytes, "rss": got.rss_bytes,
                 "ratio": ratio})
    print(f"{name:>18}  {pred.total / MiB:9.1f}  {got.peak_bytes / MiB:9.1f}  {ratio:9.3f}  {pred.total / pred.floor:10.3f}"
          f"  {pred.phase}", flush=True)

target = dict(batch_size=8, seq_len=1024, accum_steps=4)
everything = fm.ablation(cfg, target["batch_size"], target["seq_len"], policy="mixed_bf16",
                         accum_steps=target["accum_steps"], remat="all")
big = {name: {"predicted": p.total, "floor": p.floor, "phase": p.phase, "peak": p.peak} for name, p in everything}
worst = max(abs(r["ratio"] - 1) for r in rows)
print(f"\nevery measured peak within {worst:.1%} of its prediction (target 3%)")
all8 = big["all"]
print(f"predicted at {args.preset} 8 x 1024, 4 micro-batches, everything on: {all8['predicted'] / MiB:,.1f} MiB = "
      f"{all8['predicted'] / all8['floor']:.3f} x the floor ({all8['floor'] / MiB:,.1f} MiB), "
      f"{all8['predicted'] / big['baseline']['predicted']:.3f} x the fp32 baseline; peak at the {all8['phase']}")
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    json.dump({"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "accum_steps": args.accum_steps, "rows": rows, "target_shape": target, "target": big,
               "seconds": time.perf_counter() - t0, "torch": torch.__version__}, f, indent=1)
print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
if args.chart:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(rows))
    ax.bar(xs, [r["predicted"] / MiB for r in rows], 0.6, color="#9ecae1", label="predicted peak")
    ax.scatter(xs, [r["measured"] / MiB for r in rows], marker="D", color="black", zorder=3,
               label="measured (tensor tracker)")
    ax.axhline(rows[-1]["floor"] / MiB, color="black", linestyle="--", linewidth=1,
               label=f"floor: params + moments + one fp32 gradient ({rows[-1]['floor'] / MiB:.0f} MiB)")
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=15)
    ax.set_ylabel("MiB")
    ax.set_title(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, {args.accum_steps} micro-batches: "
                 "predicted and measured peaks", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.chart, dpi=120)
    print(f"wrote {args.chart}")
