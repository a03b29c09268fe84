"""Predict and measure the memory of each technique, alone and all together, on a CPU-sized GPT.

Run:
    python examples/memory_ablation.py [--chart memory_ablation.png]

Ends by printing OK once all techniques together measure below the baseline.

The ledger predicts the peak bytes of one training step from the model's shapes: params, the
half-precision copy a mixed policy makes, gradients, AdamW's moments, the accumulator, the
activations each block saves for backward, and the cross-entropy's buffers. Each configuration is
then trained for a few real steps in a fresh subprocess, which reports its peak of live tensor bytes
(what the ledger counts) and its peak resident memory (what the machine paid). The baseline is fp32,
one micro-batch, no remat and an untied output head; the library itself always ties the head.
"""

import argparse

import functional_memopt as fm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--chart", default=None, help="also write a PNG chart here (needs matplotlib)")
args = parser.parse_args()

cfg = fm.ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)
batch_size, seq_len = 16, 128

# One step's peak, predicted for each technique alone and for all of them together.
for name, pred in fm.ablation(cfg, batch_size, seq_len, policy="mixed_bf16", accum_steps=4, remat="all"):
    where = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in pred.peak.items())
    print(f"{name:>10}: {pred.total / 2**20:6.1f} MiB at the {pred.phase} ({where})")

# The same rows, each measured over two real training steps in its own process.
rows = fm.ablation_report(cfg, batch_size, seq_len, steps=2, policy="mixed_bf16", accum_steps=4, remat="all")
print()
print(fm.format_table(rows))
if args.chart:
    fm.plot_ablation(rows, args.chart, title=f"{cfg.n_layer} layers x {cfg.n_embd}, batch {batch_size} x {seq_len}")

baseline, everything = rows[0]["measurement"], rows[-1]["measurement"]
ratio = everything.peak_bytes / baseline.peak_bytes
print(f"\nall techniques together: {ratio:.2f} of the baseline's measured peak "
      f"({everything.peak_bytes / 2**20:.1f} vs {baseline.peak_bytes / 2**20:.1f} MiB)")
assert everything.peak_bytes < baseline.peak_bytes
assert everything.rss_bytes < baseline.rss_bytes
print("OK")
