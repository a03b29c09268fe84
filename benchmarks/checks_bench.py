"""What the step's two checks cost: the batch check and the non-finite update guard, per tiny-preset step.

Run:
    python benchmarks/checks_bench.py [--policy mixed_bf16] [--reps 30] [--out benchmarks/out/checks.json]

Two measurements, each of four steps timed in interleaved rounds (A B C D A B C D ...) after a
warm-up, on one thread, with the app's settings (tiny preset, batch 32 as 4 micro-batches of 8,
sequence 128, clipping at 1.0, donated state): neither check, the batch check alone, the guard
alone, both. The clock is the process's user CPU time (one intra-op thread: steady when other
processes share the cores), and a check's cost is the median over rounds of its paired difference
to the unchecked step of the same round.

1. Whole steps: the honest figure, but a busy machine's noise is ~1% of a step.
2. The same steps around a loss that costs next to nothing (one pass over every leaf): the batch,
   the update and the host sync are the same, so the differences are the checks' own cost,
   resolved far below that noise. Reported as a share of the whole unchecked step.
3. What skipping a donated step's non-finite update inside the step would cost: a dry run of the
   optimizer's update, undonated, before the donated one (the pure update of AdamW over the same
   params, as a share of the step). ARCHITECTURE.md says why the step does not pay it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics

import optree
import torch

import functional_memopt as fm

VARIANTS = {"neither": (False, False), "batch check": (True, False), "guard": (False, True), "both": (True, True)}


def user_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def leaves(tree):
    """The tensors of the params tree (nested dicts and lists), in order."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v)
    else:
        yield tree


def cheap_loss(params, batch):
    """(loss_sum, count) like the model's loss, for next to nothing: every leaf read once (dense gradients)."""
    return sum((x * x).sum() for x in leaves(params)) * 0.0 + 1.0, torch.tensor(1.0)


def interleaved(cfg, policy: str, data, *, loss_fn, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Per variant, the user CPU seconds of each timed step (one round = every variant once, same batch)."""
    runs = {}
    for name, (check, guard) in VARIANTS.items():
        opt = fm.adamw(fm.warmup_cosine(2e-3, 10, 10_000), weight_decay=0.1, mask=fm.decay_mask)
        state = fm.init_train_state(fm.init_params(cfg), opt, policy=policy)
        step = fm.make_train_step(cfg, opt, policy=policy, accum_steps=4, max_grad_norm=1.0, donate=True,
                                  loss_fn=loss_fn, validate_batch=check, guard_updates=guard)
        runs[name] = [state, step]
    times = {name: [] for name in VARIANTS}
    for r in range(warmup + rounds):
        batch = fm.sample_batch(data, 32, 128, seed=0, index=r)
        for name, run in runs.items():
            t0 = user_s()
            run[0], m = run[1](run[0], batch)
            float(m["loss"])  # the host sync the training loop makes
            if r >= warmup:
                times[name].append(user_s() - t0)
    return times


def dry_run_s(cfg, policy: str, reps: int) -> list[float]:
    """User CPU seconds of the pure AdamW update of the tiny preset's master params, ``reps`` times."""
    opt = fm.adamw(fm.warmup_cosine(2e-3, 10, 10_000), weight_decay=0.1, mask=fm.decay_mask)
    state = fm.init_train_state(fm.init_params(cfg), opt, policy=policy)
    g = torch.Generator().manual_seed(0)
    grads = optree.tree_map(lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e-2, state.params)
    times = []
    for r in range(reps + 3):
        t0 = user_s()
        opt.update(grads, state.opt_state, state.params)
        if r >= 3:
            times.append(user_s() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="mixed_bf16", help="precision policy (default mixed_bf16)")
    parser.add_argument("--reps", type=int, default=30, help="timed rounds of whole steps (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = fm.get_config("tiny")
    data = torch.randint(0, cfg.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
    whole = interleaved(cfg, args.policy, data, loss_fn=None, rounds=args.reps, warmup=args.warmup)
    alone = interleaved(cfg, args.policy, data, loss_fn=cheap_loss, rounds=20 * args.reps, warmup=args.warmup)
    base = statistics.median(whole["neither"])
    out = {"policy": args.policy, "threads": 1, "reps": args.reps, "step_ms": base * 1e3, "whole": {}, "alone": {}}
    print(f"tiny preset, batch 32 = 4 x 8, seq 128, {args.policy}, 1 thread; step without checks "
          f"{base * 1e3:.1f} ms (median user CPU time of {args.reps} interleaved rounds)")
    print(f"{'':12} {'whole steps':>26} {'around a ~free loss':>30}")
    for name in ("batch check", "guard", "both"):
        w = statistics.median(a - b for a, b in zip(whole[name], whole["neither"]))
        a = statistics.median(x - y for x, y in zip(alone[name], alone["neither"]))
        out["whole"][name] = {"ms": w * 1e3, "percent": 100 * w / base}
        out["alone"][name] = {"ms": a * 1e3, "percent": 100 * a / base}
        print(f"{name:12} {w * 1e3:+9.2f} ms = {100 * w / base:+6.2f}% {a * 1e3:+12.3f} ms = {100 * a / base:+7.3f}%")
    dry = statistics.median(dry_run_s(cfg, args.policy, args.reps))
    out["dry_run"] = {"ms": dry * 1e3, "percent": 100 * dry / base}
    print(f"{'dry run':12} {dry * 1e3:+9.2f} ms = {100 * dry / base:+6.2f}%  (a pure AdamW update: what skipping a "
          "donated step's non-finite update in the step would add)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
