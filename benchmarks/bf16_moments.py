"""Would AdamW's moments in bf16 do? The drift measured, before any code is built for it.

Run:
    python benchmarks/bf16_moments.py [--steps 150] [--out benchmarks/out/bf16_moments.json]

Storing mu and nu in bf16 would save 4 bytes per parameter (a quarter of the optimizer-state
floor). It is only worth building if the moments stay close to float32 ones. Two measurements:

1. The second moment under a constant gradient g = 1: ``nu = b2 * nu + (1 - b2) * g * g`` tends to
   1 in float32; rounded to bf16 after each step (round to nearest, as a bf16 store does), the
   increment ``(1 - b2) * (1 - nu)`` falls below half a bf16 ulp of nu once nu reaches 0.25
   (half an ulp there is 2**-10, the increment 0.00075), and nu stops there. The update ``mu / sqrt(nu)`` is then too large by ``1 / sqrt(nu)``.
2. The tiny preset trained for ``--steps`` steps on the default corpus, fp32, with AdamW's state
   rounded to bf16 after every update (the values a bf16 store would hold; the memory saving is
   not emulated), against the same run in float32: validation loss and the relative distance of
   the params.
"""

import argparse
import json
import os

import optree
import torch

import functional_memopt as fm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--out", default=os.path.join("benchmarks", "out", "bf16_moments.json"))
args = parser.parse_args()
torch.set_num_threads(2)

# 1. nu under a constant gradient.
b2 = 0.999
nu32 = torch.zeros((), dtype=torch.float32)
nu16 = torch.zeros((), dtype=torch.bfloat16)
trace = []
for t in range(1, 5001):
    nu32 = b2 * nu32 + (1 - b2)
    nu16 = (b2 * nu16.float() + (1 - b2)).to(torch.bfloat16)
    if t in (10, 100, 500, 1000, 2000, 5000):
        trace.append({"step": t, "nu_fp32": float(nu32), "nu_bf16": float(nu16),
                      "update_ratio": float(nu32.sqrt() / nu16.float().sqrt())})
        print(f"step {t:5d}: nu fp32 {float(nu32):.4f}, bf16 {float(nu16):.4f}; bf16 update / fp32 update "
              f"{trace[-1]['update_ratio']:.3f}")

# 2. A short training run with the moments rounded to bf16 after each update.
cfg = fm.get_config("tiny")
data = fm.load_corpus()
split = int(0.9 * len(data))
train, val = data[:split], data[split:]


def run(round_moments: bool):
    opt = fm.adamw(fm.warmup_cosine(1e-3, warmup_steps=args.steps // 8, total_steps=args.steps))
    step = fm.make_train_step(cfg, opt, accum_steps=4, max_grad_norm=1.0)
    state = fm.init_train_state(fm.init_params(cfg, seed=0), opt)
    for i in range(args.steps):
        state, _ = step(state, fm.sample_batch(train, 32, 128, seed=0, index=i))
        if round_moments:
            rounded = optree.tree_map(lambda x: x.to(torch.bfloat16).to(x.dtype) if x.is_floating_point() and x.dim()
                                      else x, (state.opt_state.mu, state.opt_state.nu))
            state = state._replace(opt_state=state.opt_state._replace(mu=rounded[0], nu=rounded[1]))
    with torch.no_grad():
        losses = [fm.loss_fn(state.params, b.tokens, b.targets, cfg) for b in
                  (fm.sample_batch(val, 32, 128, seed=1, index=j) for j in range(8))]
    return state.params, float(sum(s for s, _ in losses) / sum(c for _, c in losses))


p32, val32 = run(False)
p16, val16 = run(True)
drift = float(sum((a - b).double().square().sum() for a, b in zip(optree.tree_leaves(p16), optree.tree_leaves(p32)))
              ** 0.5 / sum(b.double().square().sum() for b in optree.tree_leaves(p32)) ** 0.5)
print(f"tiny, {args.steps} steps: validation loss fp32 moments {val32:.4f}, bf16-rounded moments {val16:.4f} "
      f"({val16 / val32 - 1:+.2%}); params' relative L2 distance {drift:.2e}")
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    json.dump({"nu_constant_gradient": trace, "steps": args.steps, "val_loss_fp32": val32, "val_loss_bf16": val16,
               "params_relative_distance": drift, "torch": torch.__version__}, f, indent=1)
print(f"wrote {args.out}")
