"""The CUDA-only section: model FLOPs utilisation of GPT-2 (124M) in bf16 with torch.compile,
fp16 with loss scaling against bf16, and which scaled-dot-product-attention backend serves.

MFU follows nanoGPT's ``estimate_mfu``: 6N + 12 L H Q T flops per token (N the parameters
without the position table, L layers, H heads, Q head width, T the sequence length), against the
card's peak dense bf16 flops.
"""

from __future__ import annotations

import math
import time
import traceback

import torch

import functional_memopt as fm

from .runners import Variant, make_runner
from .timing import interleave, ratio

# Peak dense bf16 tensor-core flops per second, by a substring of torch.cuda.get_device_name.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))


def peak_bf16_flops(name: str) -> float | None:
    """The card's peak dense bf16 flops, or None for a card not in the table."""
    for key, flops in PEAK_BF16:
        if key.lower() in name.lower():
            return flops
    return None


def flops_per_step(cfg: fm.ModelConfig, rows: int, seq: int) -> float:
    """nanoGPT's estimate: (6N + 12 L H Q T) flops per token, times the tokens of one step."""
    n = sum(math.prod(s) for s in fm.param_shapes(cfg).values()) - cfg.block_size * cfg.n_embd
    per_token = 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq
    return per_token * rows * seq


def sdpa_backends(cfg: fm.ModelConfig, batch: fm.Batch) -> dict:
    """Which SDPA backends run the model's forward + backward in bf16, and the kernels the default picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = fm.init_params(cfg, seed=0, device=batch.tokens.device)
    grad = fm.value_and_grad(fm.with_policy(lambda p, b: fm.make_loss_fn(cfg)(p, b)[0], "mixed_bf16"))
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                grad(params, batch)
            torch.cuda.synchronize()
            out[name] = "ok"
        except Exception as err:
            out[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            grad(params, batch)
            torch.cuda.synchronize()
        names = sorted({e.key for e in prof.key_averages() if any(
            w in e.key.lower() for w in ("flash", "fmha", "attention", "efficient", "cudnn", "sdpa"))})
        out["default_kernels"] = names[:12]
    except Exception as err:  # the backend checks above stand on their own
        out["default_kernels_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return out


def gpu_benchmark(spec: dict, log, emit=None) -> dict:
    """MFU of eager and compiled steps, fp16 / bf16 time, SDPA backends (CUDA only).

    ``emit(out)`` is called after each stage with the results so far, so that a stage cut off by
    the time limit leaves the earlier ones behind.
    """
    emit = emit or (lambda result: None)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    cfg = fm.get_config(spec["preset"])
    rows, seq = spec["rows"], spec["seq"]
    batch = fm.sample_batch(fm.load_corpus(), rows, seq, seed=0, index=0, device=device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = {"device_name": name, "peak_bf16_flops": peak, "preset": spec["preset"], "batch": [rows, seq],
           "flops_per_step": flops_per_step(cfg, rows, seq), "errors": {}}
    try:
        log("gpu: SDPA backends")
        out["sdpa"] = sdpa_backends(cfg, fm.sample_batch(fm.load_corpus(), 2, seq, seed=0, index=0, device=device))
    except Exception as err:
        out["errors"]["sdpa"] = f"{type(err).__name__}: {err}"
    params = fm.init_params(cfg, seed=0, device=device)

    def timed_group(specs: dict, reps: int) -> dict:
        runners, compile_s = {}, {}
        for label, v in specs.items():
            try:
                run = make_runner(cfg, params, batch, v)
                if v.compile:
                    log(f"gpu: compiling {label}")
                    t0 = time.perf_counter()
                    run()
                    torch.cuda.synchronize()
                    compile_s[label] = time.perf_counter() - t0
                runners[label] = run
            except Exception as err:
                out["errors"][label] = f"{type(err).__name__}: {str(err)[:300]}"
                out.setdefault("tracebacks", {})[label] = traceback.format_exc()[-2000:]
        t = interleave(runners, warmup=2, reps=reps, device=device, clock="wall") if runners else {}
        return {"timings": {k: {kk: v[kk] for kk in ("s", "wall_s", "reps")} for k, v in t.items()},
                "compile_s": compile_s, "_raw": t}

    emit(out)
    log("gpu: fp16 + loss scaling / bf16")
    g = timed_group({"func fp16 + dynamic loss scale": Variant(precision="fp16"),
                     "func bf16": Variant(precision="bf16"),
                     "ref fp16 + GradScaler": Variant(kind="ref", precision="fp16"),
                     "ref bf16": Variant(kind="ref", precision="bf16")}, spec["reps"])
    raw = g.pop("_raw")
    g["ratios"] = {f"{a} / {b}": ratio(raw, a, b) for a, b in
                   [("func fp16 + dynamic loss scale", "func bf16"), ("ref fp16 + GradScaler", "ref bf16")]
                   if a in raw and b in raw}
    out["fp16_vs_bf16"] = g
    emit(out)
    torch.cuda.empty_cache()
    log("gpu: bf16 eager / compiled")
    specs = {"func eager": Variant(precision="bf16"),
             "func compiled": Variant(precision="bf16", compile=True),  # make_train_step(compile=True)
             "ref eager": Variant(kind="ref", precision="bf16"),
             "ref compiled model": Variant(kind="ref", precision="bf16", compile=True)}
    g = timed_group(specs, spec["reps"])
    raw = g.pop("_raw")
    for label, t in g["timings"].items():
        t["tokens_per_s"] = rows * seq / t["s"]
        t["mfu"] = out["flops_per_step"] / t["s"] / peak if peak else None
    g["ratios"] = {f"{a} / {b}": ratio(raw, a, b) for a, b in
                   [("func compiled", "ref compiled model"), ("func eager", "ref eager"),
                    ("func compiled", "func eager")] if a in raw and b in raw}
    out["bf16"] = g

    return out
