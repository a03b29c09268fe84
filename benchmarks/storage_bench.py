"""File size and save / load time of params files, against torch.save / torch.load.

Run:
    python benchmarks/storage_bench.py --out benchmarks/out/storage.json [--preset gpt2] [--repeats 3]

For each format the same params are saved and loaded ``--repeats`` times; the median time is
reported. Loads follow their save, so the file is usually in the page cache: the figures compare
serialisation cost, not disk speed. ``load_params`` returns fp32 masters (an upcast for fp16/bf16
files) and checks shapes and finiteness; ``torch.load`` returns the stored dtype unchecked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

import functional_memopt as fm
from harness.trees import tree_cast, tree_numel  # benchmarks/ is on sys.path: this script's folder


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder for the files (default: a temp folder)")
    args = parser.parse_args()

    cfg = fm.get_config(args.preset)
    params = fm.init_params(cfg, seed=0)
    n_params = tree_numel(params)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for name, dtype in [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
            path = os.path.join(d, f"params_{name}.safetensors")
            save = timed(lambda: fm.save_params(path, params, cfg, dtype=dtype), args.repeats)
            load = timed(lambda: fm.load_params(path), args.repeats)
            load_stored = timed(lambda: fm.load_params(path, dtype=dtype), args.repeats)
            rows.append(dict(method="save_params", dtype=name, bytes=os.path.getsize(path), save_s=save,
                             load_s=load, load_stored_dtype_s=load_stored))
        for name, dtype in [("fp32", torch.float32), ("fp16", torch.float16)]:
            path = os.path.join(d, f"params_{name}.pt")
            tree = tree_cast(params, dtype)  # torch.save stores what it is given; cast outside the timer
            save = timed(lambda: torch.save(tree, path), args.repeats)
            load = timed(lambda: torch.load(path, weights_only=True), args.repeats)
            rows.append(dict(method="torch.save", dtype=name, bytes=os.path.getsize(path), save_s=save,
                             load_s=None, load_stored_dtype_s=load))
    result = dict(preset=args.preset, n_params=n_params, repeats=args.repeats, torch=torch.__version__,
                  machine=platform.machine(), threads=torch.get_num_threads(), rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"{args.preset}: {n_params / 1e6:.1f}M params, median of {args.repeats}, torch {torch.__version__}\n")
    print("| method | stored dtype | file MB | save s | load s (fp32 masters) | load s (stored dtype) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        load = "-" if r["load_s"] is None else f"{r['load_s']:.3f}"
        print(f"| {r['method']} | {r['dtype']} | {r['bytes'] / 2**20:.1f} | {r['save_s']:.3f} | {load} | "
              f"{r['load_stored_dtype_s']:.3f} |")


if __name__ == "__main__":
    main()
