"""How step time and peak memory grow with the work: the functional step against the imperative recipe.

Run from the repository root:
    python benchmarks/growth.py                      # all three axes (a few minutes on 2 cores)
    python benchmarks/growth.py --axes accum --reps 5
    python benchmarks/growth.py --chart benchmarks/growth.png

Three axes, each a list of points; at each point both runners take interleaved steps on the same
fixed batch (fp32, AdamW, clipping at 1.0, the functional step donated as ``memopt train`` runs it,
the reference updating in place; one thread, user CPU time: ``harness.timing``), and one
more step of each runs under ``fm.TensorMemoryTracker``, which gives the peak of live tensor bytes
(state, batch, activations, gradients, optimizer temporaries):

- ``seq``: sequence length 128 -> 1024 at 4 rows, tiny and small (block size raised to fit);
- ``width``: tiny -> small -> gpt2 at 2 x 128 (x = parameter count);
- ``accum``: 1 -> 16 micro-batches of one 16 x 128 batch, tiny.

The growth exponent of each series is the least-squares slope of log(y) against log(x): 1 is linear
growth, 2 quadratic, 0 flat. Writes benchmarks/out/growth.json (and a PNG with --chart, needs
matplotlib) and prints the table that RESULTS.md's growth section shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import functional_memopt  # noqa: F401
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(1, os.path.dirname(HERE))

import optree  # noqa: E402
import torch  # noqa: E402

import functional_memopt as fm  # noqa: E402
from functional_memopt.testing.reference import ImperativeTrainer, ReferenceGPT  # noqa: E402
from harness.runners import LR, MAX_GRAD_NORM, WEIGHT_DECAY, FunctionalRunner, Variant  # noqa: E402
from harness.timing import interleave, ratio  # noqa: E402

AXES = ("seq", "width", "accum")


def points(axis: str) -> list[dict]:
    """The points of an axis: series name, x, config, rows, seq len, accumulation."""
    out = []
    if axis == "seq":
        for preset in ("tiny", "small"):
            for t in (128, 256, 512, 1024):
                cfg = dataclasses.replace(fm.get_config(preset), block_size=max(t, fm.get_config(preset).block_size))
                out.append(dict(series=f"{preset}, T", x=t, cfg=cfg, rows=4, seq=t, accum=1))
    elif axis == "width":
        for preset in ("tiny", "small", "gpt2"):
            cfg = fm.get_config(preset)
            n = sum(x.numel() for x in optree.tree_leaves(fm.init_params(cfg)))
            out.append(dict(series="preset, params", x=n, cfg=cfg, rows=2, seq=128, accum=1, label=preset))
    elif axis == "accum":
        for k in (1, 2, 4, 8, 16):
            out.append(dict(series="tiny, accum", x=k, cfg=fm.get_config("tiny"), rows=16, seq=128, accum=k))
    return out


def _peak_bytes(step, track) -> int:
    """Peak live tensor bytes of one call of ``step``, counting what ``track()`` returns as live first."""
    tracker = fm.TensorMemoryTracker()
    tracker.track(track())
    with tracker:
        step()
    return tracker.peak


def measure(p: dict, *, warmup: int, reps: int) -> dict:
    """Time both runners at one point, then measure each one's peak tensor bytes."""
    data = fm.load_corpus()
    cfg = p["cfg"]
    batch = fm.sample_batch(data, p["rows"], p["seq"], seed=0, index=0)
    params = fm.init_params(cfg, seed=0)
    v = Variant(precision="fp32", accum=p["accum"], donate=True)  # as memopt train runs it
    func = FunctionalRunner(cfg, params, batch, v)
    trainer = ImperativeTrainer(ReferenceGPT.from_params(params, cfg), lr=LR, weight_decay=WEIGHT_DECAY,
                                precision="fp32", accum_steps=p["accum"], max_grad_norm=MAX_GRAD_NORM)
    ref = lambda: trainer.step(batch.tokens, batch.targets)  # noqa: E731
    t = interleave({"functional": func, "reference": ref}, warmup=warmup, reps=reps, device=torch.device("cpu"),
                   clock="user")

    def ref_live():
        opt_state = [x for s in trainer.opt.state.values() for x in s.values() if isinstance(x, torch.Tensor)]
        return [list(trainer.model.parameters()), opt_state, batch]

    mem_f = _peak_bytes(func, lambda: [func.state, batch])
    mem_r = _peak_bytes(ref, ref_live)
    return dict(series=p["series"], x=p["x"], label=p.get("label", str(p["x"])), rows=p["rows"], seq=p["seq"],
                accum=p["accum"], model=cfg.to_dict(), func_s=t["functional"]["s"], ref_s=t["reference"]["s"],
                **ratio(t, "functional", "reference"), func_peak_bytes=mem_f, ref_peak_bytes=mem_r,
                reps=t["functional"]["reps"])


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(a for a, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    var = sum((a - mx) ** 2 for a, _ in pts)
    return sum((a - mx) * (b - my) for a, b in pts) / var if var else None


def exponents(rows: list[dict]) -> list[dict]:
    """Per series: the fitted growth exponents of time and peak memory, functional and reference."""
    out = []
    for series in dict.fromkeys(r["series"] for r in rows):
        rs = [r for r in rows if r["series"] == series]
        xs = [r["x"] for r in rs]
        out.append(dict(series=series, points=len(rs), **{
            f"{what}_{side}": slope(xs, [r[f"{side}_{key}"] for r in rs])
            for what, key in (("time", "s"), ("memory", "peak_bytes")) for side in ("func", "ref")}))
    return out


def table(result: dict) -> str:
    """The markdown tables: every point, then the exponents."""
    lines = ["| series | x | batch | functional ms | reference ms | ratio | functional peak MiB | "
             "reference peak MiB | memory ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['series']} | {r['label']} | {r['rows']}x{r['seq']}/{r['accum']} | {r['func_s'] * 1e3:.1f} "
                     f"| {r['ref_s'] * 1e3:.1f} | {r['ratio']:.3f} | {r['func_peak_bytes'] / 2**20:.1f} | "
                     f"{r['ref_peak_bytes'] / 2**20:.1f} | {r['func_peak_bytes'] / r['ref_peak_bytes']:.3f} |")
    lines += ["", "| series | points | time exponent, functional | reference | memory exponent, functional | "
              "reference |", "| --- | --- | --- | --- | --- | --- |"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for e in result["exponents"]:
        lines.append(f"| {e['series']} | {e['points']} | {f(e['time_func'])} | {f(e['time_ref'])} | "
                     f"{f(e['memory_func'])} | {f(e['memory_ref'])} |")
    return "\n".join(lines)


def chart(result: dict, path: str) -> None:
    """Log-log panels, one per axis: step time (solid) and peak memory (dashed), both runners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = list(dict.fromkeys(r["series"] for r in result["rows"]))
    fig, axes = plt.subplots(2, len(series), figsize=(4 * len(series), 6.5), squeeze=False)
    for i, s in enumerate(series):
        rs = [r for r in result["rows"] if r["series"] == s]
        xs = [r["x"] for r in rs]
        for row, (key, unit, scale) in enumerate((("s", "step ms", 1e3), ("peak_bytes", "peak MiB", 2**-20))):
            ax = axes[row][i]
            for side, style in (("func", "o-"), ("ref", "s--")):
                ax.plot(xs, [r[f"{side}_{key}"] * scale for r in rs], style,
                        label="functional" if side == "func" else "reference")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(xs, [r["label"] for r in rs])  # the points themselves, not log-scale minor labels
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(s if row == 0 else "", fontsize=10)
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0 and i == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Time and peak tensor memory as the work grows (fp32, one thread)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axes", nargs="*", default=list(AXES), choices=AXES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "out", "growth.json"))
    parser.add_argument("--chart", default=None, help="also write a PNG chart here (needs matplotlib)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.monotonic()
    rows = []
    for axis in args.axes:
        for p in points(axis):
            print(f"[{time.monotonic() - t0:7.1f} s] {p['series']} = {p.get('label', p['x'])}", file=sys.stderr,
                  flush=True)
            rows.append(measure(p, warmup=args.warmup, reps=args.reps))
    result = {"rows": rows, "exponents": exponents(rows), "threads": 1, "precision": "fp32",
              "command": "python benchmarks/growth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seconds": time.monotonic() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(table(result))
    if args.chart:
        chart(result, args.chart)
        print(f"wrote {args.chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
