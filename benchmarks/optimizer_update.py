"""One AdamW update on a model's params: the library's routes against torch's own optimizers.

Run:
    python benchmarks/optimizer_update.py [--presets tiny,small] [--reps 40]

For each preset (fp32 params, the benchmark's decay mask, gradients of 1e-3 scale) six runners
are timed interleaved, one thread, user CPU time, median of ``--reps`` rounds after three untimed:

- ``update + apply_updates``, pure and donated: the optax-style pair. The fused kernel steps a
  working buffer, the update is that buffer minus the params, and ``apply_updates`` adds it back.
- ``update_and_apply``, pure and donated: the kernel steps the params themselves (pure: a copy of
  params and moments), which is what the train step runs.
- ``torch.optim.AdamW(foreach=True)`` (the reference recipe's optimizer) and ``fused=True``.

Ratios are against torch's foreach step, measured in the same run. The update is a fixed cost per
optimizer step, so it weighs most at accumulation 1 on small batches.
"""

import argparse
import os
import sys

import optree
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import functional_memopt as fm  # noqa: E402
from harness.runners import LR, WEIGHT_DECAY  # noqa: E402
from harness.timing import interleave  # noqa: E402


def runners(cfg: fm.ModelConfig) -> dict:
    """name -> a zero-argument callable doing one AdamW update of ``cfg``'s params."""
    params = fm.init_params(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    grads = optree.tree_map(lambda x: torch.randn(x.shape, generator=g) * 1e-3, params)
    opt = fm.adamw(LR, weight_decay=WEIGHT_DECAY)
    clone = lambda tree: optree.tree_map(torch.clone, tree)  # noqa: E731
    pure_state = opt.init(params)
    donated = {"pair": [clone(params), opt.init(params)], "apply": [clone(params), opt.init(params)]}

    def pair_pure():
        updates, _ = opt.update(grads, pure_state, params)
        return fm.apply_updates(params, updates)

    def apply_pure():
        return fm.update_and_apply(opt, grads, pure_state, params)

    def pair_donated():
        p, s = donated["pair"]
        updates, s = opt.update(clone(grads), s, p, donate=True)  # the pair writes over the gradients
        donated["pair"] = [fm.apply_updates(p, updates, donate=True), s]

    def apply_donated():
        p, s = donated["apply"]
        donated["apply"] = list(fm.update_and_apply(opt, grads, s, p, donate=True))

    out = {"update + apply_updates, pure": pair_pure, "update_and_apply, pure": apply_pure,
           "update + apply_updates, donated": pair_donated, "update_and_apply, donated": apply_donated}
    for kind in ("foreach", "fused"):
        leaves = [torch.nn.Parameter(x.clone()) for x in optree.tree_leaves(params)]
        for p, gr in zip(leaves, optree.tree_leaves(grads)):
            p.grad = gr.clone()
        torch_opt = torch.optim.AdamW(leaves, lr=LR, weight_decay=WEIGHT_DECAY, **{kind: True})
        out[f"torch AdamW({kind}=True)"] = torch_opt.step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for preset in args.presets.split(","):
        cfg = fm.get_config(preset)
        run = runners(cfg)
        t = interleave(run, warmup=3, reps=args.reps, device=torch.device("cpu"), clock="user")
        ref = t["torch AdamW(foreach=True)"]["s"]
        n = sum(x.numel() for x in optree.tree_leaves(fm.init_params(cfg)))
        print(f"{preset} ({n / 1e6:.2f} M params, fp32), user CPU time per update, one thread:")
        for name, v in t.items():
            print(f"  {name:34s} {v['s'] * 1e3:7.3f} ms  {v['s'] / ref:5.2f} x torch foreach")


if __name__ == "__main__":
    main()
