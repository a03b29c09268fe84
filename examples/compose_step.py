"""Compose a memory-lean training step by hand and train a small byte-level GPT on Python's docs.

Run:
    python examples/compose_step.py

Every technique is a choice in one call: a precision policy (bf16 compute, fp32 masters), gradient
accumulation as a fold over micro-batches, rematerialised blocks, a tied embedding (always on in
this model), an optimizer chain, and clipping. The step is a pure function of (state, batch).
"""

import math
import time

import torch

import functional_memopt as fm

torch.manual_seed(0)
cfg = fm.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
data = fm.load_corpus()  # Python's own reference documentation, shipped with every Python
train, val = fm.train_val_split(data)

steps, batch_size, accum = 60, 8, 2
optimizer = fm.chain(
    fm.clip_by_global_norm(1.0),
    fm.adamw(fm.warmup_cosine(3e-3, 10, steps, final=3e-4), weight_decay=0.1, mask=fm.decay_mask),
)
step = fm.make_train_step(cfg, optimizer, policy="mixed_bf16", accum_steps=accum, remat="all")
state = fm.init_train_state(fm.init_params(cfg, seed=0), optimizer, policy="mixed_bf16")


def val_bits_per_byte(params):
    loss_sum, count = torch.zeros(()), torch.zeros(())
    for i in range(8):
        b = fm.sample_batch(val, 16, cfg.block_size, seed=99, index=i)
        s, c = fm.loss_fn(params, b.tokens, b.targets, cfg)
        loss_sum, count = loss_sum + s, count + c
    return float(loss_sum / count) / math.log(2)


before = val_bits_per_byte(state.params)
t0 = time.perf_counter()
for i in range(steps):
    batch = fm.sample_batch(train, batch_size, cfg.block_size, seed=0, index=i)
    state, metrics = step(state, batch)
    if i % 20 == 0:
        print(f"step {i:4d}  loss {float(metrics['loss']):.3f}  grad norm {float(metrics['grad_norm']):.2f}")
elapsed = time.perf_counter() - t0
after = val_bits_per_byte(state.params)
print(f"validation bits/byte: {before:.3f} -> {after:.3f} in {steps} steps ({elapsed:.1f} s)")
assert after < before - 1.0, "training did not lower the validation loss"
assert state.params["wte"].dtype == torch.float32  # fp32 masters under the mixed policy
print("OK")
