"""results.json -> RESULTS.md: every figure in the report is read from the results."""

from __future__ import annotations

import math
from typing import Any

from .findings import findings

MiB = 2**20


def jsonable(x: Any, scrub: dict[str, str] | None = None) -> Any:
    """``x`` with tuples as lists, tensors as numbers, non-finite floats as None (strict JSON), and
    each key of ``scrub`` replaced by its value in strings (so no local path reaches the files)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v, scrub) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, scrub) for v in x]
    if isinstance(x, str):
        for old, new in sorted((scrub or {}).items(), key=lambda kv: -len(kv[0])):
            x = x.replace(old, new)
        return x
    if hasattr(x, "tolist") and not isinstance(x, bytes):
        return jsonable(x.tolist(), scrub)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _ms(s) -> str:
    return "-" if s is None else f"{1e3 * s:.1f}" if s >= 0.01 else f"{1e3 * s:.2f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.3f}"


def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def _ok(met) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _error(section: dict) -> str | None:
    if not isinstance(section, dict):
        return None
    if "error" in section:
        tail = section.get("stderr_tail") or []
        return f"**error**: {section['error']}" + ("\n\n```\n" + "\n".join(tail) + "\n```" if tail else "")
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    return None


def _meta(m: dict, mode: str) -> str:
    clock = ("process CPU time in user mode (one intra-op thread: the work of this process alone, steady when "
             "other processes share the cores; kernel time, mostly page faults that depend on which runner ran "
             "before, is recorded apart as `sys`)" if m["clock"] == "user" else "wall time, device synchronised")
    rows = [["command", f"`{m['command']}`"], ["date", m["date"]], ["mode", mode],
            ["machine", f"{m['cpu']} ({m['cpu_count']} cores, {m['machine']}, {m['system']}, {m['cpu_capability']})"],
            ["device", m.get("gpu", "cpu")], ["torch", m["torch"] + (f" (CUDA {m['cuda']})" if m.get("cuda") else "")],
            ["python", m["python"]], ["torch threads", m["threads"]], ["clock", clock],
            ["load average at start", ", ".join(f"{v:.1f}" for v in m.get("load_average_at_start", []))],
            ["run time", f"{m.get('elapsed_s', 0):.0f} s"]]
    if m.get("kept_from_previous_run"):
        runs: dict = {}  # the earlier run -> the sections kept from it
        for name in m["kept_from_previous_run"]:
            run = (m.get("section_runs") or {}).get(name) or m.get("previous") or {}
            key = (run.get("command"), run.get("date"), run.get("elapsed_s"))
            runs.setdefault(key, []).append(name)
        rows.append(["sections kept from earlier runs", "; ".join(
            ", ".join(names) + (f" (`{cmd}`, {date}, {elapsed or 0:.0f} s)" if cmd else "")
            for (cmd, date, elapsed), names in runs.items())])
    return _table(["", ""], rows)


def kept_section_runs(old_meta: dict, kept: list) -> dict:
    """For each section kept from ``old_meta``'s file, the run that measured it: {command, date, elapsed_s}.

    A section the old file itself kept carries its own record (``section_runs``); in a file from
    before those records, its ``previous``; every other section came from the run that wrote it.
    """
    this = {k: old_meta.get(k) for k in ("command", "date", "elapsed_s")}
    own = old_meta.get("section_runs") or {}
    earlier = old_meta.get("kept_from_previous_run", [])
    return {k: own.get(k) or ((old_meta.get("previous") or this) if k in earlier else this) for k in kept}


def _speed(sp: dict) -> str:
    out = ["## 1. Step time: functional / imperative reference\n",
           "Interleaved rounds after warm-up, medians; ratio = functional / reference (target <= 1.00 at "
           "accumulation 1, <= 1.05 above, for the plain and donated steps; the other variants are priced in "
           "section 2). "
           "Reference: nn.Module, torch.autocast, "
           "loss / accum, clip_grad_norm_, torch.optim.AdamW(foreach=True). Both clip at 1.0. "
           "Variants: `engine=func` (torch.func.grad_and_value), `autocast` (policy_mode), `donate`.\n"]
    rows = [[r["preset"], r["precision"], r["accum"], r["variant"], _ms(r["func_s"]), _ms(r["ref_s"]),
             _x(r["ratio"]), _x(r["paired_ratio"]), _x(r.get("min_ratio")),
             "-" if r.get("target") is None else f"<= {r['target']:.2f}", _ok(r["met"]),
             f"{_ms(r.get('func_sys_s'))} / {_ms(r.get('ref_sys_s'))}"] for r in sp["step_time"]]
    out.append(_table(["model", "precision", "accum", "functional variant", "functional ms", "reference ms",
                       "ratio", "paired", "min ratio", "target", "met", "sys ms f / r"], rows))
    out.append("\n`paired`: median of the per-round ratios; `min ratio`: ratio of the fastest rounds (the "
               "least disturbed by other processes); `sys`: median kernel time per step, not in the ratio.\n")
    shapes = ", ".join(f"{g['preset']} {g['precision']}: batch {g['batch'][0]}x{g['batch'][1]}, "
                       f"{g['warmup']} warm-up + {max(t['reps'] for t in g['timings'].values())} rounds"
                       for g in sp["groups"])
    out.append(f"\nGroups: {shapes}.\n")
    out.append("\n## 2. Cost of each technique (same interleaved groups)\n")
    rows = [[c["cost"], c["preset"], c["precision"], _ms(c["numerator_s"]), _ms(c["denominator_s"]), _x(c["ratio"]),
             _x(c["paired_ratio"]), "-" if c["target"] is None else f"<= {c['target']:.2f}", _ok(c["met"])]
            for c in sp["costs"]]
    out.append(_table(["cost", "model", "precision", "with ms", "without ms", "ratio", "paired", "target", "met"],
                      rows))
    return "\n".join(out)


def _diagnostics(d: dict) -> str:
    out = ["\n## Where the time goes (diagnostics)\n"]
    cfg = d["post_grad_model"]
    out.append(f"Post-gradient pieces for a model of n_layer {cfg['n_layer']}, n_embd {cfg['n_embd']} "
               "(interleaved medians):\n")
    out.append(_table(["piece", "ms"], [[k, _ms(v["s"])] for k, v in d["post_grad"].items()]))
    if d.get("hygiene_calls"):
        out.append("\nOne memory-hygiene call in the benchmark process (a step pays this / N with hygiene every N "
                   "steps):\n")
        out.append(_table(["call", "ms"], [[k, _ms(v["s"])] for k, v in d["hygiene_calls"].items()]))
    out.append(f"\nGradient computation only (forward + backward over the micro-batches, no optimizer), "
               f"batch {d['fold_batch'][0]}x{d['fold_batch'][1]}:\n")
    names = list(next(iter(d["fold"].values())))
    rows = [[k] + [_ms(v[n]["s"]) for n in names] for k, v in d["fold"].items()]
    out.append(_table(["precision, accumulation"] + [f"{n} ms" for n in names], rows))
    out.append("\nPython profile of one functional step at accumulation 8 (own time, per step):\n")
    out.append(_table(["function", "calls", "own ms", "cumulative ms"],
                      [[f"`{r['function']}`", r["calls"], _ms(r["own_s"]), _ms(r["cumulative_s"])]
                       for r in d["profile_a8"]]))
    return "\n".join(out)


def _compile(c: dict) -> str:
    out = ["\n## 3. torch.compile: `make_train_step(compile=True)` against the compiled reference\n"]
    err = _error(c)
    if err:
        return "\n".join(out + [err + "\n"])
    out.append("Each model and precision in a fresh process: the functional step compiles its differentiated loss "
               "(forward and backward together, autograd engine; fold, skip decision and fused AdamW eager); the "
               "reference compiles its model (`torch.compile(model)`, optimizer eager). Compile time is the first "
               "call. Target: compiled functional / compiled reference <= 0.85.\n")
    rows, times = [], []
    for run in c.get("runs", []):
        m = run.get("model", {})
        name = f"{run.get('preset', '?')} {run.get('precision', '?')} ({m.get('n_layer')}x{m.get('n_embd')}, " \
               f"batch {'x'.join(str(v) for v in run.get('batch', []))})"
        if "error" in run:
            rows.append([name, "-", "-", "-", "-", "-", run["error"]])
            continue
        r = run.get("ratios", {})
        get = lambda k: _x(r[k]["ratio"]) if k in r else "-"  # noqa: E731
        rows.append([name, get("func compiled / ref compiled model"), get("func compiled / func eager"),
                     get("ref compiled model / ref eager"), get("func eager / ref eager"),
                     run.get("graphs_compiled_after_first_call", "-"),
                     "; ".join(f"{k}: {v}" for k, v in run.get("errors", {}).items())])
        times.append([name] + [f"{run['compile_time'][k]['wall_s']:.1f}" if k in run.get("compile_time", {}) else "-"
                               for k in ("func compiled", "ref compiled model")]
                     + [_ms(run["timings"][k]["s"]) if k in run.get("timings", {}) else "-"
                        for k in ("func eager", "func compiled", "ref eager", "ref compiled model")])
    out.append(_table(["model", "compiled func / compiled ref", "compiled / eager func", "compiled / eager ref",
                       "eager func / eager ref", "graphs compiled after step 1", "errors"], rows))
    out.append("\nCompile time (wall s of the first call) and step times (ms) after compilation:\n")
    out.append(_table(["model", "func compile s", "ref compile s", "func eager", "func compiled", "ref eager",
                       "ref compiled"], times))
    return "\n".join(out)


def _memory(mem: dict) -> str:
    out = ["\n## 4. Memory\n"]
    err = _error(mem)
    if err:
        return "\n".join(out + [err + "\n"])
    m = mem["model"]
    measure = next((r["measure"] for r in mem["rows"] if r.get("measure")), "-")
    source = next((r["prediction_source"] for r in mem["rows"] if r.get("prediction_source")), "-")
    out.append(f"Model n_layer {m['n_layer']}, n_embd {m['n_embd']}, batch {mem['batch'][0]}x{mem['batch'][1]}, "
               f"accumulation {mem.get('accum')}, one fresh process per row (CPU); measured: {measure}; "
               f"predicted: {source}. The ledger's baseline is fp32 with an untied head (`tied` adds weight "
               "tying). Targets: measured within 10% of predicted; all together < 40% of the baseline.\n")
    rows = [[r["technique"], _mib(r["measured_bytes"]), _mib(r["predicted_bytes"]), r.get("predicted_phase") or "-",
             _x(r.get("measured_over_predicted")), _ok(r.get("within_tolerance")), _x(r.get("of_baseline")),
             _mib(r.get("process_peak_bytes")), r.get("error") or ""] for r in mem["rows"]]
    out.append(_table(["technique", "measured MiB", "predicted MiB", "predicted peak at", "measured / predicted",
                       "within 10%", "of baseline", "process peak MiB", "error"], rows))
    out.append("\n`process peak`: the resident set's high-water mark over the process's resident set before "
               "the run, which also counts allocator slack and what the first step leaves outside tensors "
               "(kernel code, caches).\n")
    if "all_met" in mem:
        out.append(f"\nEvery technique at once (`{mem.get('all_row')}`) < 40% of the baseline: "
                   f"{_ok(mem['all_met'])}.\n")
    out.append("\nMemory hygiene (gc.collect + torch.cuda.empty_cache after every step), default allocator:\n")
    rows = []
    for label, h in mem["hygiene"].items():
        after = h.get("after_step_bytes") or []
        rows.append([label, " / ".join(_mib(b) for b in after), _mib(h.get("peak_bytes")),
                     _mib(h.get("peak_reserved_bytes")), h.get("error") or ""])
    out.append(_table(["hygiene", "held after each step MiB (CPU: RSS over start; CUDA: reserved)", "peak MiB",
                       "peak reserved MiB", "error"], rows))
    alloc = mem.get("allocator", {})
    if "skipped" in alloc:
        out.append(f"\nPYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: skipped ({alloc['skipped']}).\n")
    elif alloc:
        out.append("\nCUDA allocator settings (one process each, bf16, accumulation):\n")
        out.append(_table(["PYTORCH_CUDA_ALLOC_CONF", "peak allocated MiB", "peak reserved MiB", "step ms", "error"],
                          [[k, _mib(v.get("peak_bytes")), _mib(v.get("peak_reserved_bytes")),
                            _ms(min(v["step_wall_s"][1:] or v["step_wall_s"])) if v.get("step_wall_s") else "-",
                            v.get("error") or ""] for k, v in alloc.items()]))
    return "\n".join(out)


def _growth(g: dict) -> str:
    out = ["\n## 6. How cost grows with the work\n"]
    err = _error(g)
    if err:
        return "\n".join(out + [err + "\n"])
    out.append("fp32, one thread; the functional step donated (as `memopt train` runs it), the reference updating "
               "in place. Step time is user CPU time (median of 3 interleaved rounds); peak is live tensor bytes "
               "(`fm.TensorMemoryTracker`) over one more step. Exponent: least-squares slope of log(y) on log(x). "
               "Batch is rows x sequence / micro-batches.\n")
    rows = [[r["series"], r["label"], f"{r['rows']}x{r['seq']}/{r['accum']}", _ms(r["func_s"]), _ms(r["ref_s"]),
             _x(r["ratio"]), _mib(r["func_peak_bytes"]), _mib(r["ref_peak_bytes"]),
             _x(r["func_peak_bytes"] / r["ref_peak_bytes"])] for r in g["rows"]]
    out.append(_table(["series", "x", "batch", "functional ms", "reference ms", "time ratio", "functional peak MiB",
                       "reference peak MiB", "memory ratio"], rows))
    out.append("\nFitted growth exponents:\n")
    out.append(_table(["series", "points", "time, functional", "time, reference", "memory, functional",
                       "memory, reference"],
                      [[e["series"], e["points"]] + [_x(e[k]) for k in ("time_func", "time_ref", "memory_func",
                                                                        "memory_ref")] for e in g["exponents"]]))
    if g.get("chart"):
        out.append(f"\n![growth]({g['chart']})\n")
    return "\n".join(out)


def _floor(f: dict) -> str:
    out = ["\n## 7. Down to the optimizer-state floor\n"]
    err = _error(f)
    if err:
        return "\n".join(out + [err + "\n"])
    out.append(f"`{f['command']}`: {f['preset']}, batch {f['batch_size']} x {f['seq_len']}, {f['accum_steps']} "
               "micro-batches. Each row of the ledger's ablation is predicted (`fm.predict_memory`) and measured "
               "(the live tensor peak of a real step, `fm.measure_memory`, a fresh process per row). The floor is "
               "params + AdamW's moments + one float32 gradient, 16 bytes per parameter. Targets: every measured "
               "peak within 3% of its prediction; at 8 x 1024, 4 micro-batches, everything on, at most 1.10x the "
               "floor.\n")
    out.append(_table(["technique", "predicted MiB", "measured MiB", "measured / predicted", "predicted / floor",
                       "peak at"],
                      [[r["name"], _mib(r["predicted"]), _mib(r["measured"]), _x(r["ratio"]),
                        _x(r["predicted"] / r["floor"]), r["phase"]] for r in f["rows"]]))
    shape = f["target_shape"]
    out.append(f"\nPredicted at {shape['batch_size']} x {shape['seq_len']}, {shape['accum_steps']} micro-batches "
               "(the shape the target is set at):\n")
    base = f["target"]["baseline"]["predicted"]
    out.append(_table(["technique", "predicted MiB", "predicted / floor", "of the fp32 baseline", "peak at"],
                      [[k, _mib(v["predicted"]), _x(v["predicted"] / v["floor"]), _x(v["predicted"] / base),
                        v["phase"]] for k, v in f["target"].items()]))
    if f.get("chart"):
        out.append(f"\n![memory floor]({f['chart']})\n")
    return "\n".join(out)


def _chunk_limit(r: dict) -> float | None:
    """A chunked-loss row's target (None: shown without one); results written before rows carried it."""
    return r.get("target", 1.02 if r["preset"] == "gpt2" else 1.05)


def _chunked(c: dict) -> str:
    out = ["\n## 8. What the chunked loss costs\n"]
    err = _error(c)
    if err:
        return "\n".join(out + [err + "\n"])
    out.append(f"`{c['command']}`: the same step with and without `loss_chunk` (the ledger's chunk), policy "
               f"{c['policy']}, interleaved in one process, user-mode CPU time per optimizer step, one thread, "
               f"median of {c['repeats']}; `paired`: the median of the per-round ratios. Targets: at most 1.05 on "
               "tiny and small, 1.02 at GPT-2's micro-batch of 8 x 1024 in 4 (2 x 1024); 2 x 128 is shown without "
               "one (256 tokens: the plain logits are small, and the chunked loss's per-chunk pass over the head's gradient "
               "is the whole difference).\n")
    out.append(_table(["preset", "batch", "micro-batches", "remat", "chunk", "plain ms", "chunked ms", "ratio",
                       "paired", "target"],
                      [[r["preset"], f"{r['rows']}x{r['seq']}", r["accum"], r["remat"] or "-", r["chunk"],
                        _ms(r["plain_s"]), _ms(r["chunked_s"]), _x(r["ratio"]),
                        _x(r["paired_ratio"]) if "paired_ratio" in r else "-",
                        "-" if _chunk_limit(r) is None else f"<= {_chunk_limit(r):.2f}"]
                       for r in c["results"]]))
    return "\n".join(out)


def _gpu(g: dict) -> str:
    out = ["\n## 5. GPU: GPT-2 124M, bf16, MFU, fp16 / bf16, SDPA backend\n"]
    err = _error(g)
    if err:
        return "\n".join(out + [err + "\n"])
    peak = g.get("peak_bf16_flops")
    out.append(f"{g['device_name']}, peak dense bf16 {peak / 1e12:.0f} TFLOPS" if peak else
               f"{g['device_name']} (peak flops unknown: MFU not computed)")
    out.append(f", batch {g['batch'][0]}x{g['batch'][1]}, {g['flops_per_step'] / 1e12:.2f} TFLOP per step "
               "(nanoGPT's 6N + 12 L H Q T per token).\n")
    bf = g.get("bf16")
    if bf:
        out.append(_table(["runner", "ms", "tokens/s", "MFU", "compile s"],
                          [[k, _ms(v["s"]), f"{v['tokens_per_s']:,.0f}",
                            "-" if v.get("mfu") is None else f"{100 * v['mfu']:.1f}%",
                            f"{bf['compile_s'][k]:.1f}" if k in bf["compile_s"] else "-"]
                           for k, v in bf["timings"].items()]))
        out.append("\n" + _table(["ratio", "value"], [[k, _x(v["ratio"])] for k, v in bf["ratios"].items()]))
    fp = g.get("fp16_vs_bf16")
    if fp:
        out.append("\n" + _table(["runner", "ms"], [[k, _ms(v["s"])] for k, v in fp["timings"].items()]))
        out.append("\n" + _table(["ratio", "value"], [[k, _x(v["ratio"])] for k, v in fp["ratios"].items()]))
    if g.get("sdpa"):
        s = g["sdpa"]
        out.append("\nSDPA backends (forward + backward of the model in bf16 with only that backend enabled):\n")
        out.append(_table(["backend", "result"], [[k, v] for k, v in s.items() if k != "default_kernels"]))
        out.append("\nAttention kernels the default dispatch ran: " +
                   (", ".join(f"`{k}`" for k in s.get("default_kernels", [])) or "none found") + "\n")
    for k, v in g.get("errors", {}).items():
        out.append(f"\n**{k} failed**: {v}\n")
    return "\n".join(out)


COMPILE_TARGET = 0.85  # compiled functional step / compiled reference


def targets(r: dict) -> list[list]:
    """Every row of this run that has a target: [section, row, value, target, met]."""
    out = []
    sp = r.get("speed") or {}
    for row in sp.get("step_time", []):
        if row.get("target") is not None:
            out.append(["step time", f"{row['preset']} {row['precision']} {row['variant']} / reference",
                        row["ratio"], f"<= {row['target']:.2f}", row["met"]])
    for c in sp.get("costs", []):
        if c.get("target") is not None:
            out.append(["technique cost", f"{c['preset']} {c['precision']} {c['cost']}", c["ratio"],
                        f"<= {c['target']:.2f}", c["met"]])
    for run in (r.get("compile") or {}).get("runs", []):
        v = run.get("ratios", {}).get("func compiled / ref compiled model")
        if v is not None:
            out.append(["compile", f"{run.get('preset')} {run.get('precision')} compiled functional / compiled "
                        "reference", v["ratio"], f"<= {COMPILE_TARGET:.2f}", bool(v["ratio"] <= COMPILE_TARGET)])
    gpu = r.get("gpu") or {}
    compiled = ((gpu.get("bf16") or {}).get("timings") or {}).get("func compiled")
    if compiled and compiled.get("mfu") is not None:
        out.append(["gpu", "MFU of the compiled functional step, bf16", compiled["mfu"], ">= 0.50",
                    bool(compiled["mfu"] >= 0.50)])
    fp = ((gpu.get("fp16_vs_bf16") or {}).get("ratios") or {}).get("func fp16 + dynamic loss scale / func bf16")
    if fp:
        out.append(["gpu", "fp16 with dynamic loss scaling / bf16, functional", fp["ratio"], "<= 1.05",
                    bool(fp["ratio"] <= 1.05)])
    fl = r.get("floor") or {}
    for row in fl.get("rows", []):
        out.append(["floor", f"{fl['preset']} {fl['batch_size']}x{fl['seq_len']} {row['name']}: measured / predicted",
                    row["ratio"], "within 3%", bool(abs(row["ratio"] - 1) <= 0.03)])
    if fl.get("target"):
        all8 = fl["target"]["all"]
        shape = fl["target_shape"]
        out.append(["floor", f"{fl['preset']} {shape['batch_size']}x{shape['seq_len']}, {shape['accum_steps']} "
                    "micro-batches, everything on: predicted / floor", all8["predicted"] / all8["floor"], "<= 1.10",
                    bool(all8["predicted"] / all8["floor"] <= 1.10)])
    for row in (r.get("chunked") or {}).get("results", []):
        limit = _chunk_limit(row)
        if limit is None:
            continue
        out.append(["chunked loss", f"{row['preset']} {row['rows']}x{row['seq']} chunk {row['chunk']}: chunked / "
                    "plain step time", row["ratio"], f"<= {limit:.2f}", bool(row["ratio"] <= limit)])
    mem = r.get("memory") or {}
    for row in mem.get("rows", []):
        if row.get("within_tolerance") is not None:
            out.append(["memory", f"{row['technique']}: measured / predicted", row["measured_over_predicted"],
                        "within 10%", row["within_tolerance"]])
    if "all_met" in mem:
        last = next((x for x in mem["rows"] if x.get("technique") == mem.get("all_row")), {})
        out.append(["memory", "every technique at once / fp32 baseline", last.get("of_baseline"), "< 0.40",
                    mem["all_met"]])
    return out


def _targets(r: dict) -> str:
    rows = targets(r)
    met = sum(1 for x in rows if x[4])
    head = [f"\n## Targets: {met} of {len(rows)} met\n"]
    if not rows:
        return "\n".join(head + ["No row of this run has a target.\n"])
    missed = [x for x in rows if not x[4]]
    head.append("Missed:" + (" none.\n" if not missed else "\n\n" + "\n".join(
        f"- {x[0]}: {x[1]}: {_x(x[2])} (target {x[3]})" for x in missed) + "\n"))
    head.append(_table(["section", "row", "value", "target", "met"],
                       [[a, b, _x(c), d, _ok(e)] for a, b, c, d, e in rows]))
    return "\n".join(head)


def markdown(r: dict) -> str:
    """The whole report."""
    parts = ["# Benchmark results\n", "Generated by `benchmarks/run.py` from `results.json`; run it again to "
             "regenerate both.\n", _meta(r["meta"], r["mode"]), _targets(r)]
    sp = r.get("speed")
    if sp is not None:
        parts.append("\n" + (_error(sp) or _speed(sp)))
    d = r.get("diagnostics")
    if d is not None:
        parts.append(_error(d) or _diagnostics(d))
    parts.append(_compile(r.get("compile", {"skipped": "not run"})))
    if r.get("memory") is not None:
        parts.append(_memory(r["memory"]))
    parts.append(_gpu(r.get("gpu", {"skipped": "not run"})))
    parts.append(_growth(r.get("growth", {"skipped": "not run"})))
    parts.append(_floor(r.get("floor", {"skipped": "not run"})))
    parts.append(_chunked(r.get("chunked", {"skipped": "not run"})))
    parts.append(findings(r))
    return "\n".join(parts)
