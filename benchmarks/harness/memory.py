"""Figure 4: peak memory of each technique alone and all together, next to the ledger's prediction;
what memory hygiene costs and gives back; the CUDA allocator's expandable segments.

The techniques are measured with the library's own ``fm.measure_memory`` (a fresh process per
configuration on the CPU, exact live tensor bytes, and the resident set beside them) on the
ledger's ``fm.ablation`` rows, plus in-place (donated) updates. Without them the benchmark
measures itself, also in a fresh process per row: the bytes the run holds between steps plus the
rise of the resident-set high-water mark (``fm.rss_peak``, reset by ``fm.reset_rss_peak``) over a
step, with glibc told to map every block of 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_) so
that freed tensors leave the resident set at once. On CUDA the peak is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import time

import torch

import functional_memopt as fm

from .runners import PRECISIONS, Variant, functional_runner
from .spawn import spawn
from .trees import tree_bytes

MEMORY_TARGET_ALL = 0.40  # all techniques together, as a fraction of the fp32 baseline
LEDGER_TOLERANCE = 0.10  # measured within 10% of predicted
CPU_ALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_worker(spec: dict) -> dict:
    """In a fresh process: set up one functional runner, step it, and report its memory.

    The first step is a warm-up; the peak is measured over the later ones. On the CPU the peak is
    the bytes the run holds between steps (params, optimizer state, batch: counted exactly) plus
    how far the resident set rose above its level before the step, so that what the first step
    leaves behind outside tensors (kernel code, primitive caches) is not counted as step memory.
    """
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    cfg = fm.ModelConfig.from_dict(spec["cfg"])
    v = Variant(**spec["variant"])
    data = fm.load_corpus()
    batch = fm.sample_batch(data, spec["rows"], spec["seq"], seed=0, index=0, device=device)
    del data
    gc.collect()
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else fm.rss_now()
    params = fm.init_params(cfg, seed=0, device=device)
    run = functional_runner(cfg, params, batch, v)
    del params
    gc.collect()
    times, after, reset, rise = [], [], False, 0
    held = tree_bytes((run.state.params, run.state.opt_state)) + tree_bytes(tuple(batch))
    for i in range(spec["steps"]):
        measured = i >= spec.get("measure_from", 1)
        if i == spec.get("measure_from", 1):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            else:
                gc.collect()
                before = fm.rss_now()
                reset = fm.reset_rss_peak()
        t0 = time.perf_counter()
        metrics = run()
        float(metrics["loss"])  # waits for the step's work
        times.append(time.perf_counter() - t0)
        after.append((torch.cuda.memory_reserved(device) if cuda else fm.rss_now()) - (0 if cuda else base))
        if measured and not cuda:
            rise = max(rise, fm.rss_peak() - before)
    out = {"step_wall_s": times, "after_step_bytes": after, "loss": float(metrics["loss"]), "held_bytes": held}
    if cuda:
        out.update(peak_bytes=torch.cuda.max_memory_allocated(device) - base,
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
                   reserved_bytes=torch.cuda.memory_reserved(device),
                   allocated_bytes=torch.cuda.memory_allocated(device) - base, measure="cuda max_memory_allocated")
    else:
        out.update(peak_bytes=held + rise, process_peak_bytes=fm.rss_peak() - base, rss_bytes=fm.rss_now() - base,
                   measure="state bytes + rise of the resident set over the step (VmHWM)"
                   + ("" if reset else "; the peak could not be reset, so it may include set-up"))
    return out


def _settings(v: Variant) -> dict:
    return dict(policy=PRECISIONS[v.precision][0], accum_steps=v.accum, remat=v.remat, donate=v.donate)


def _prediction(cfg: fm.ModelConfig, rows: int, seq: int, device: str, v: Variant) -> tuple[dict | None, str]:
    if not hasattr(fm, "predict_memory"):
        return None, "ledger not available (no fm.predict_memory)"
    try:
        p = fm.predict_memory(cfg, batch_size=rows, seq_len=seq, device=device, tied=True, **_settings(v))
    except Exception as err:  # a ledger that refuses the settings is reported, not fatal
        return None, f"{type(err).__name__}: {err}"
    return {"total": p.total, "phase": p.phase, "peak": p.peak}, "fm.predict_memory"


def technique_variants(accum: int) -> dict[str, Variant]:
    """The fp32 baseline, each technique alone, and all together (all functional steps)."""
    return {
        "baseline (fp32, pure step)": Variant(),
        "mixed bf16 (cast)": Variant(precision="bf16"),
        f"accumulation {accum}": Variant(accum=accum),
        "remat all blocks": Variant(remat="all"),
        "donate (in-place update)": Variant(donate=True),
        "all together": Variant(precision="bf16", accum=accum, remat="all", donate=True),
    }


def _spec(cfg, rows, seq, v, device, threads, steps) -> dict:
    from dataclasses import asdict

    return {"cfg": cfg.to_dict(), "rows": rows, "seq": seq, "variant": asdict(v), "device": device.type,
            "threads": threads, "steps": steps}


def _measure(spec: dict, *, timeout: float, env: dict | None = None) -> dict:
    """A fresh process on the CPU (a clean high-water mark); in this process on CUDA, where the
    caching allocator's own peak counter is exact and a new context would cost seconds."""
    if spec["device"] == "cpu":
        return spawn("memory", spec, timeout=timeout, env=env)
    try:
        return memory_worker(spec)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _library_rows(cfg: fm.ModelConfig, rows: int, seq: int, accum: int, device: str) -> list | None:
    """[(name, MemorySettings, prediction)]: the ledger's ablation plus donated updates; None
    when the library has no ledger or no measurement."""
    if not all(hasattr(fm, name) for name in ("ablation", "predict_memory", "measure_memory")):
        return None
    table = [(name, p.settings, p) for name, p in fm.ablation(cfg, rows, seq, accum_steps=accum, device=device)]
    extra = [("donate (in-place update)", table[0][1]._replace(donate=True)),
             ("all + donate", table[-1][1]._replace(donate=True))]
    for name, s in extra:
        table.append((name, s, fm.predict_memory(cfg, batch_size=rows, seq_len=seq, device=device, **s._asdict())))
    return table


def _measure_with_library(cfg, rows, seq, settings, device: torch.device, timeout: float) -> dict:
    try:
        m = fm.measure_memory(cfg, batch_size=rows, seq_len=seq, settings=settings, device=device.type,
                           timeout=timeout)
    except Exception as err:  # one failing row is reported, the others still run
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {"peak_bytes": m.peak_bytes, "process_peak_bytes": m.rss_bytes,
            "measure": f"fm.measure_memory ({m.method})"}


def run_memory(cfg: fm.ModelConfig, rows: int, seq: int, *, accum: int, device: torch.device, threads: int,
               hygiene_steps: int, timeout: float, log, max_rows: int | None = None) -> dict:
    """The technique ablation, memory hygiene, and (CUDA) expandable segments.

    ``max_rows=2`` measures the baseline and all techniques together only (quick runs).
    """
    env = CPU_ALLOC_ENV if device.type == "cpu" else {}
    out = {"model": cfg.to_dict(), "batch": [rows, seq], "accum": accum, "rows": [], "hygiene": {},
           "allocator": {}}
    base_bytes = None
    library = _library_rows(cfg, rows, seq, accum, device.type)
    if library is not None:
        plan = [(name, s, p, None) for name, s, p in library]
    else:
        plan = [(name, None, None, v) for name, v in technique_variants(accum).items()]
    if max_rows is not None and max_rows < len(plan):
        all_row = next(i for i, r in enumerate(plan) if r[0] in ("all", "all together"))
        plan = plan[: max_rows - 1] + [plan[all_row]]
    for name, settings, pred_full, v in plan:
        log(f"memory: {name}")
        if v is None:
            res = _measure_with_library(cfg, rows, seq, settings, device, timeout)
            pred = {"total": pred_full.total, "phase": pred_full.phase}
            source, shown = "fm.ablation / fm.predict_memory", settings._asdict()
        else:
            res = _measure(_spec(cfg, rows, seq, v, device, threads, steps=2), timeout=timeout, env=env)
            pred, source = _prediction(cfg, rows, seq, device.type, v)
            shown = _settings(v)
        row = {"technique": name, "settings": shown, "measured_bytes": res.get("peak_bytes"),
               "process_peak_bytes": res.get("process_peak_bytes"),
               "predicted_bytes": pred["total"] if pred else None, "predicted_phase": pred["phase"] if pred else None,
               "prediction_source": source, "measure": res.get("measure"), "error": res.get("error")}
        if row["measured_bytes"] and row["predicted_bytes"]:
            row["measured_over_predicted"] = row["measured_bytes"] / row["predicted_bytes"]
            row["within_tolerance"] = abs(row["measured_over_predicted"] - 1) <= LEDGER_TOLERANCE
        if base_bytes is None:
            base_bytes = row["measured_bytes"]
        if row["measured_bytes"] and base_bytes:
            row["of_baseline"] = row["measured_bytes"] / base_bytes
        out["rows"].append(row)
    last = out["rows"][-1]  # every technique at once ("all + donate", or "all together")
    out["all_row"] = last["technique"]
    if last.get("of_baseline") is not None:
        out["all_target"] = MEMORY_TARGET_ALL
        out["all_met"] = last["of_baseline"] < MEMORY_TARGET_ALL

    # Memory hygiene: what the process holds after each step, with and without it (default allocator).
    for label, every in (("off", 0), ("every step", 1)):
        log(f"memory: hygiene {label}")
        spec = _spec(cfg, rows, seq, Variant(hygiene_every=every), device, threads, steps=hygiene_steps)
        res = _measure(spec, timeout=timeout)
        out["hygiene"][label] = {k: res.get(k) for k in ("after_step_bytes", "peak_bytes", "peak_reserved_bytes",
                                                          "step_wall_s", "error")}
    if device.type == "cuda":
        for label, conf in (("default", None), ("expandable_segments:True", "expandable_segments:True")):
            log(f"memory: allocator {label}")
            spec = _spec(cfg, rows, seq, Variant(precision="bf16", accum=accum), device, threads, steps=4)
            res = spawn("memory", spec, timeout=timeout, env={"PYTORCH_CUDA_ALLOC_CONF": conf} if conf else None,
                        unset=("PYTORCH_CUDA_ALLOC_CONF",))
            out["allocator"][label] = {k: res.get(k) for k in ("peak_bytes", "peak_reserved_bytes", "reserved_bytes",
                                                                "step_wall_s", "error")}
    else:
        out["allocator"] = {"skipped": "PYTORCH_CUDA_ALLOC_CONF applies to the CUDA caching allocator only"}
    return out
