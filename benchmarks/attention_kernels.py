"""The two attention kernels, forward and backward, by dtype and sequence length: what "auto" rests on.

Run:
    python benchmarks/attention_kernels.py [--reps 7]

For each shape (B, h, T, d) and dtype, the fused-QKV attention of ``model/attention.py`` runs
forward and backward (``torch.autograd.grad`` of the output against a fixed cotangent) with
``kernel="sdpa"`` and ``kernel="math"``, interleaved, one thread, user CPU time; the median of
``--reps`` rounds after two untimed ones. The last columns say which kernel ``"auto"`` picks and
the math kernel's (B, h, T, T) probabilities per token against what a block saves anyway (16C per
token at the default MLP ratio).
"""

import argparse
import resource
import statistics

import torch

from functional_memopt import attention_kernel, causal_attention

SHAPES = [(8, 4, 128, 32), (8, 6, 128, 64), (4, 6, 256, 64), (2, 6, 512, 64), (1, 12, 768, 64), (1, 12, 1024, 64)]


def _user() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| dtype | B, h, T, d | sdpa ms | math ms | math / sdpa | auto | probabilities / block's saved |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for B, h, T, d in SHAPES:
            C = h * d
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, T, C, generator=g).to(dtype).requires_grad_()
            c_attn = {"weight": (torch.randn(3 * C, C, generator=g) * C**-0.5).to(dtype)}
            c_proj = {"weight": (torch.randn(C, C, generator=g) * C**-0.5).to(dtype)}
            cot = torch.randn(B, T, C, generator=g).to(dtype)
            times = {"sdpa": [], "math": []}
            for r in range(args.reps + 2):
                for kernel, out in times.items():
                    t0 = _user()
                    y = causal_attention(x, c_attn, c_proj, h, kernel=kernel)
                    torch.autograd.grad(y, x, cot)
                    if r >= 2:
                        out.append(_user() - t0)
            sdpa, math_ = (statistics.median(times[k]) * 1e3 for k in ("sdpa", "math"))
            auto = attention_kernel("auto", T, d, dtype, "cpu")
            extra = h * T / (16 * C)
            print(f"| {str(dtype).removeprefix('torch.')} | {B}, {h}, {T}, {d} | {sdpa:.2f} | {math_:.2f} | "
                  f"{math_ / sdpa:.2f} | {auto} | {extra:.2f} |", flush=True)


if __name__ == "__main__":
    main()
