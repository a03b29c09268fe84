"""GPT-2's GELU compiled for the CPU: torch's tanh form against the library's x * sigmoid(2u) form.

Run:
    python benchmarks/activation_bench.py [--reps 20]

Forward and backward of the MLP's activation on the (tokens, 4C) pre-activation of the tiny and
small presets at 8 x 128 tokens, one thread, user CPU time, interleaved, median of ``--reps``
rounds after three untimed. Runners: eager ``F.gelu(approximate="tanh")`` (what the eager step
runs), the same compiled (what inductor makes of torch's tanh GELU, as in a compiled nn.Module
recipe), ``fm.activate`` compiled (the library's compiled step: x * sigmoid(2u)), and the erf
GELU eager and compiled for scale. Ratios are against compiled torch, in the same run. Each
runner's largest error against float64 torch is printed beside its time, in units of the dtype's
epsilon times max(1, |value|).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from functional_memopt import activate


def forward_backward(fn):
    def run(x, g):
        x = x.detach().requires_grad_()
        y = fn(x)
        (dx,) = torch.autograd.grad(y, x, g)
        return y, dx

    return run


def error_in_eps(got, want, dtype) -> float:
    """max |got - want| / (eps * max(1, |want|)) over both outputs."""
    eps = torch.finfo(dtype).eps
    return max(float(((a.detach().double() - b).abs() / (eps * b.abs().clamp(min=1.0))).max()) for a, b in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fns = {
        "torch tanh GELU, eager": forward_backward(lambda x: F.gelu(x, approximate="tanh")),
        "torch tanh GELU, compiled": forward_backward(torch.compile(lambda x: F.gelu(x, approximate="tanh"))),
        "activate('gelu_tanh'), compiled": forward_backward(torch.compile(lambda x: activate(x, "gelu_tanh"))),
        "torch erf GELU, eager": forward_backward(F.gelu),
        "torch erf GELU, compiled": forward_backward(torch.compile(F.gelu)),
    }
    exact = {"tanh": forward_backward(lambda x: F.gelu(x, approximate="tanh")), "erf": forward_backward(F.gelu)}
    for dtype in (torch.float32, torch.bfloat16):
        for preset, width in (("tiny", 512), ("small", 1536)):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1024, width, generator=gen).to(dtype)
            g = torch.randn(1024, width, generator=gen).to(dtype)
            for fn in fns.values():
                for _ in range(3):
                    fn(x, g)
            times = {k: [] for k in fns}
            for _ in range(args.reps):
                for k, fn in fns.items():
                    t0 = time.process_time()
                    fn(x, g)
                    times[k].append(time.process_time() - t0)
            ref = statistics.median(times["torch tanh GELU, compiled"])
            print(f"{preset} MLP, 1024 x {width}, {str(dtype).replace('torch.', '')}, forward + backward:")
            for k, ts in times.items():
                want = exact["erf" if "erf" in k else "tanh"](x.double(), g.double())
                err = error_in_eps(fns[k](x, g), want, dtype)
                print(f"  {k:34s} {statistics.median(ts) * 1e3:7.3f} ms  {statistics.median(ts) / ref:5.2f} x"
                      f"  max error {err:6.1f} eps")


if __name__ == "__main__":
    main()
