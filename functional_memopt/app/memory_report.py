"""``memopt memory``: the ledger's ablation table, measured where it fits, as text, JSON and a chart.

    memopt memory --preset tiny --batch-size 8 --policy mixed_bf16 --accum-steps 4 --remat all \\
        --chart memory.png --json memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import torch

from ..memory.ledger import ITEMS, MemoryPrediction, ablation
from ..memory.measure import MemoryMeasurement, measure_memory
from ..model.config import PRESETS, ModelConfig, get_config
from ..model.remat import remat_layers
from .format import format_bytes

__all__ = ["add_memory_arguments", "memory_command", "ablation_report", "format_table", "plot_ablation"]

MiB = 2**20
FIT_FRACTION = 0.7  # measure only configurations predicted to take under this share of free memory
_SHORT = {"params": "params", "compute_params": "compute", "gradients": "grads", "optimizer": "optim",
          "accumulator": "accum", "activations": "activ", "logits": "logits", "update": "update", "batch": "batch"}


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``memopt memory`` options to ``parser``."""
    add = parser.add_argument
    add("--preset", default="tiny", help=f"model shape, one of {', '.join(PRESETS)} (default tiny)")
    for name in ("n-layer", "n-head", "n-embd", "vocab-size", "block-size"):
        add(f"--{name}", type=int, default=None, help=f"override the preset's {name.replace('-', '_')}")
    add("--batch-size", type=int, default=8, help="rows per step (default 8)")
    add("--seq-len", type=int, default=None, help="tokens per row (default: the block size)")
    add("--policy", default="mixed_bf16", help="precision of the precision row (default mixed_bf16)")
    add("--accum-steps", type=int, default=4, help="micro-batches of the accumulation row (default 4)")
    add("--remat", default="all", help="blocks of the remat row: all, none, every n-th (int), or i,j,k")
    add("--loss-chunk", default="auto", help="tokens per chunk of the chunked-loss row: auto (the ledger's "
        "choice), none, or N")
    add("--zero-stage", type=int, default=0, choices=(0, 1, 2), help="ZeRO stage of a sharding row (default 0)")
    add("--world-size", type=int, default=1, help="ranks for the ZeRO row (default 1)")
    add("--device", default="auto", help="auto, cpu or cuda (default auto)")
    add("--measure", action=argparse.BooleanOptionalAction, default=True,
        help="run real steps to measure each configuration that fits (default on)")
    add("--method", default="auto", choices=("auto", "tensors", "rss"),
        help="CPU measure: peak live tensor bytes (auto) or peak RSS in a subprocess")
    add("--steps", type=int, default=3, help="training steps per measurement (default 3)")
    add("--chart", default=None, metavar="PATH", help="write a PNG chart (needs matplotlib)")
    add("--json", default=None, metavar="PATH", help="write the rows as JSON")


def _remat_spec(text: str, n_layer: int) -> Any:
    """``--remat`` as remat_layers reads it, checked against the model's blocks."""
    try:
        remat_layers(text, n_layer)
    except ValueError as err:
        raise ValueError(f"memory: --remat must be all, none, an int n or indices i,j,k ({err}).") from None
    return None if text.strip().lower() == "none" else text.strip().lower()


def _loss_chunk(text: str) -> int | str | None:
    text = text.strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"memory: --loss-chunk must be auto, none or an integer >= 1, got {text!r}.")


def _free_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ablation_report(cfg: ModelConfig, batch_size: int, seq_len: int, *, measure: bool = True,
                    method: str = "auto", steps: int = 3, device: str = "cpu", **techniques) -> list[dict]:
    """The ablation rows, each measured where it fits.

    A configuration is measured only if its predicted peak is under FIT_FRACTION of the free memory
    (RAM, or GPU memory on CUDA) and it runs in one process (not a ZeRO row); otherwise its note
    says why not.

    Args:
        cfg, batch_size, seq_len, device: as for :func:`predict_memory`.
        measure: run the measurements at all.
        method, steps: as for :func:`measure_memory`.
        **techniques: policy, accum_steps, remat, zero_stage, world_size for :func:`ablation`.

    Returns:
        ``[{"name", "prediction", "measurement" (or None), "note"}, ...]``, baseline first.

    Example:
        >>> rows = ablation_report(get_config("tiny"), 8, 128, measure=False)
        >>> rows[0]["name"], rows[0]["measurement"]
        ('baseline', None)
    """
    rows = []
    free = _free_bytes(device) if measure else 0
    for name, pred in ablation(cfg, batch_size, seq_len, device=device, **techniques):
        row = {"name": name, "prediction": pred, "measurement": None, "note": ""}
        if not measure:
            row["note"] = "not measured (measurement off)"
        elif pred.settings.zero_stage > 0 and pred.settings.world_size > 1:
            row["note"] = "not measured: ZeRO needs world-size processes"
        elif pred.total > FIT_FRACTION * free:
            row["note"] = (f"not measured: predicted {pred.total / MiB:.0f} MiB > {FIT_FRACTION:.0%} of "
                           f"{free / MiB:.0f} MiB free")
        else:
            row["measurement"] = measure_memory(cfg, batch_size=batch_size, seq_len=seq_len, settings=pred.settings,
                                                steps=steps, device=device, method=method)
        rows.append(row)
    return rows


def _mib(n: int | None) -> str:
    return format_bytes(n or None, unit="MiB", suffix=False)


def format_table(rows: list[dict]) -> str:
    """A text table: the predicted peak and what it holds, the measured peak, and the ratios.

    The item columns are the bytes alive at the predicted peak (they add up to "pred MiB"); "peak
    at" names that moment. With tensor measurements on the CPU the subprocess's RSS is shown too.
    """
    items = [k for k in ITEMS if any(r["prediction"].peak.get(k) for r in rows)]
    rss = any(r["measurement"] and r["measurement"].method != "rss" and r["measurement"].rss_bytes for r in rows)
    head = ["technique", *(_SHORT[k] for k in items), "pred MiB", "peak at", "meas MiB", "meas/pred",
            "pred/base", "meas/base", "pred/floor"] + (["rss MiB"] if rss else [])
    base_p = rows[0]["prediction"].total
    base_m = rows[0]["measurement"].peak_bytes if rows[0]["measurement"] else None
    body = []
    for r in rows:
        p: MemoryPrediction = r["prediction"]
        m: MemoryMeasurement | None = r["measurement"]
        got = m.peak_bytes if m else None
        body.append([r["name"], *(_mib(p.peak.get(k)) for k in items), _mib(p.total), p.phase, _mib(got),
                     f"{got / p.total:.3f}" if got else "-", f"{p.total / base_p:.2f}",
                     f"{got / base_m:.2f}" if got and base_m else "-", f"{p.total / p.floor:.2f}"]
                    + ([_mib(m and m.rss_bytes)] if rss else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append(f"  floor (params + optimizer moments + one float32 gradient) of the last row: "
               f"{_mib(rows[-1]['prediction'].floor)} MiB")
    notes: dict[str, list] = {}
    for r in rows:
        if r["note"]:
            notes.setdefault(r["note"], []).append(r["name"])
    out += [f"  {', '.join(names) if len(names) < len(rows) else 'all rows'}: {note}" for note, names in notes.items()]
    return "\n".join(out)


def plot_ablation(rows: list[dict], path: str, *, title: str) -> None:
    """Stacked bars of each row's predicted peak by item, measured peaks as markers, saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("memory: --chart needs matplotlib; install it (pip install matplotlib) "
                          "or leave out --chart.") from None
    names = [r["name"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(rows) + 4), 4.8))
    bottom = [0.0] * len(rows)
    colors = plt.get_cmap("tab10").colors
    for i, item in enumerate(ITEMS):
        h = [r["prediction"].peak.get(item, 0) / MiB for r in rows]
        if any(h):
            ax.bar(xs, h, 0.6, bottom=bottom, label=item.replace("_", " "), color=colors[i % 10])
            bottom = [b + x for b, x in zip(bottom, h)]
    kinds = (("tensor_bytes", "measured: peak tensor bytes", "D"), ("rss_bytes", "measured: peak RSS", "o"),
             ("cuda_bytes", "measured: CUDA max allocated", "D"))
    tops = list(bottom)
    for field, label, marker in kinds:
        pts = [(x, getattr(r["measurement"], field) / MiB) for x, r in zip(xs, rows)
               if r["measurement"] and getattr(r["measurement"], field)]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=46, zorder=3, label=label,
                       facecolors="black" if marker == "D" else "none", edgecolors="black")
            for x, y in pts:
                tops[x] = max(tops[x], y)
    for x, r in zip(xs, rows):  # the predicted total above everything drawn in its column
        ax.annotate(f"{r['prediction'].total / MiB:.0f}", (x, tops[x]), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 5), textcoords="offset points")
    floor = rows[-1]["prediction"].floor / MiB  # the bytes no technique here removes
    ax.axhline(floor, color="black", linestyle="--", linewidth=1,
               label=f"floor: params + moments + one fp32 gradient ({floor:.0f} MiB)")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("MiB (bars: predicted bytes alive at the peak)")
    ax.set_xlabel("technique (each alone, then all together); number: predicted peak in MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylim(0, max(tops + [1.0]) * 1.12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _to_json(rows: list[dict], meta: dict) -> dict:
    out = []
    for r in rows:
        p, m = r["prediction"], r["measurement"]
        out.append({"name": r["name"], "settings": p.settings._asdict(), "predicted_total": p.total,
                    "peak_phase": p.phase, "peak": p.peak, "items": p.breakdown(), "moments": p.moments,
                    "floor": p.floor,
                    "measured": m._asdict() if m else None, "note": r["note"]})
    return {**meta, "rows": out}


def memory_command(args: argparse.Namespace) -> int:
    """Run ``memopt memory``: print the table, write --json and --chart; returns the exit code."""
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
                 if getattr(args, k, None) is not None}
    cfg = get_config(args.preset, **overrides)  # ValueError for an unknown preset or a bad shape
    seq_len = args.seq_len if args.seq_len is not None else cfg.block_size
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"memory: --device must be auto, cpu or cuda (with CUDA available), got {args.device!r}.")
    if args.steps < 1:
        raise ValueError(f"memory: --steps must be >= 1, got {args.steps}.")
    if args.measure and device == "cuda" and args.method == "rss":
        raise ValueError("memory: --method rss measures the CPU; on CUDA leave --method auto.")
    rows = ablation_report(cfg, args.batch_size, seq_len, measure=args.measure, method=args.method,
                           steps=args.steps, device=device, policy=args.policy, accum_steps=args.accum_steps,
                           remat=_remat_spec(args.remat, cfg.n_layer), loss_chunk=_loss_chunk(args.loss_chunk),
                           zero_stage=args.zero_stage, world_size=args.world_size)
    title = (f"{args.preset}: {cfg.n_layer} layers, width {cfg.n_embd}, vocab {cfg.vocab_size}; "
             f"batch {args.batch_size} x {seq_len} tokens on {device}")
    print(f"memory ledger, {title}")
    print(format_table(rows))
    if args.json:
        meta = {"preset": args.preset, "config": dataclasses.asdict(cfg), "batch_size": args.batch_size,
                "seq_len": seq_len, "device": device}
        with open(args.json, "w") as f:
            json.dump(_to_json(rows, meta), f, indent=1, default=str)
    if args.chart:
        measured = any(r["measurement"] is not None for r in rows)
        what = "Predicted peak by item, measured peak as markers" if measured else "Predicted peak by item (not measured)"
        plot_ablation(rows, args.chart, title=f"{what}\n{title}")
        print(f"memopt: chart written to {args.chart}")
    return 0
