"""Predict and measure the memory of each technique, alone and all together, on a CPU-sized GPT.

Run:
    python examples/memory_ablation.py

Ends by printing OK once all techniques together measure below the baseline.

The ledger predicts the peak bytes of one training step from the model's shapes: params, the
half-precision copy a mixed policy makes, gradients, AdamW's moments, the accumulator, the
activations each block saves for backward, and the cross-entropy's buffers. Each configuration is
then trained for a few real steps in a fresh subprocess, which reports its peak of live tensor bytes
(what the ledger counts) and its peak resident memory (what the machine paid). The baseline is fp32,
one micro-batch, no remat and an untied output head; the library itself always ties the head.
"""

import functional_memopt as fm

cfg = fm.ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)
batch_size, seq_len = 16, 128

# One step's peak, predicted for each technique alone and for all of them together, then measured
# over two real training steps in a fresh process each.
print(f"{'technique':>10}  {'predicted':>9}  {'measured':>8}  {'meas/pred':>9}  peak at  (MiB alive at the peak)")
measured = {}
for name, pred in fm.ablation(cfg, batch_size, seq_len, policy="mixed_bf16", accum_steps=4, remat="all"):
    got = fm.measure_memory(cfg, batch_size=batch_size, seq_len=seq_len, settings=pred.settings, steps=2)
    measured[name] = got
    where = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in pred.peak.items())
    print(f"{name:>10}  {pred.total / 2**20:9.1f}  {got.peak_bytes / 2**20:8.1f}  {got.peak_bytes / pred.total:9.3f}  "
          f"{pred.phase:<7}  ({where})")

baseline, everything = measured["baseline"], measured["all"]
ratio = everything.peak_bytes / baseline.peak_bytes
print(f"\nall techniques together: {ratio:.2f} of the baseline's measured peak "
      f"({everything.peak_bytes / 2**20:.1f} vs {baseline.peak_bytes / 2**20:.1f} MiB); "
      "a chart of the same table: memopt memory --chart memory.png")
assert everything.peak_bytes < baseline.peak_bytes
assert everything.rss_bytes < baseline.rss_bytes
print("OK")
