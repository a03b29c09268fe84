"""The report's last part: missed targets, and the measured pieces that explain them.

The causes are stated next to the figures that show them, so a cause no longer measured (once
fixed) drops out or reads differently on the next run.
"""

from __future__ import annotations


def _ms(s) -> str:
    return "-" if s is None else f"{1e3 * s:.1f}" if s >= 0.01 else f"{1e3 * s:.2f}"


def _cost_rows(sp: dict, prefix: str) -> list[dict]:
    return [c for c in sp.get("costs", []) if c["cost"].startswith(prefix)]


def findings(r: dict) -> str:
    """Missed targets, then the measured pieces that explain them."""
    out = ["\n## Missed targets and their causes\n"]
    sp = r.get("speed", {}) if isinstance(r.get("speed"), dict) else {}
    missed = [f"step time {x['preset']} {x['precision']} a{x['accum']} `{x['variant']}`: {x['ratio']:.3f} > "
              f"{x['target']:.2f} (paired {x['paired_ratio']:.3f})"
              for x in sp.get("step_time", []) if x["met"] is False]
    missed += [f"{c['cost']} ({c['preset']} {c['precision']}): {c['ratio']:.3f} > {c['target']:.2f}"
               for c in sp.get("costs", []) if c["met"] is False]
    mem = r.get("memory", {}) if isinstance(r.get("memory"), dict) else {}
    missed += [f"memory `{x['technique']}`: measured / predicted {x['measured_over_predicted']:.3f}"
               for x in mem.get("rows", []) if x.get("within_tolerance") is False]
    if mem.get("all_met") is False:
        missed.append("memory: all techniques together not under 40% of the baseline")
    for run in (r.get("compile") or {}).get("runs", []):
        v = run.get("ratios", {}).get("func compiled / ref compiled model")
        if v is not None and v["ratio"] > 0.85:
            missed.append(f"compile {run['preset']} {run['precision']}: compiled functional / compiled reference "
                          f"{v['ratio']:.3f} > 0.85")
    out.append("\n".join(f"- {m}" for m in missed) + "\n" if missed else "None.\n")
    out.append("\nRatios within a few percent of 1 move by about as much from run to run on a shared machine "
               "(compare `paired` and `min ratio`); the causes below are measured piece by piece.\n")
    d = r.get("diagnostics", {}) if isinstance(r.get("diagnostics"), dict) else {}
    pg = d.get("post_grad")
    if pg:
        get = lambda key: next((v["s"] for k, v in pg.items() if k.startswith(key)), None)  # noqa: E731
        fin, fused, unscale = get("finite: tree_all_finite"), get("finite + unscale"), get("unscale:")
        pure, donate, pair = get("adamw pure"), get("adamw donate"), get("adamw pair")
        ref_adamw, fused_adamw, sel = get("reference: torch.optim"), get("torch.optim.AdamW(fused"), get("tree_select")
        out.append("**Step time, after the gradients** (per step, model of the post-gradient table):\n")
        out.append(f"- Finite check: the step takes `isfinite(global norm)` from the norm pass it makes for "
                   f"clipping anyway ({_ms(get('global norm'))} ms), so the check itself is free; a separate "
                   f"`tree_all_finite` would cost {_ms(fin)} ms, GradScaler's fused check-and-unscale kernel "
                   f"{_ms(fused)} ms. Under a loss scale the unscale multiply adds {_ms(unscale)} ms.\n")
        if None not in (pure, donate, ref_adamw):
            out.append(f"- Optimizer: the step runs AdamW's fused kernel on the params themselves "
                       f"(`update_and_apply`). Pure (a copy of params and moments stepped, the caller's state "
                       f"untouched): {_ms(pure)} ms; donated (in place): {_ms(donate)} ms; "
                       f"torch.optim.AdamW(foreach=True), in place: {_ms(ref_adamw)} ms"
                       + (f"; fused=True: {_ms(fused_adamw)} ms" if fused_adamw else "")
                       + (f"; the optax-style pair (`update`, then `apply_updates`), pure: {_ms(pair)} ms"
                          if pair else "") + ". What pure pays over donated is the price of purity: the copy "
                       "of params and moments.\n")
        norm, ref_clip = get("global norm"), get("reference norm + clip")
        if None not in (pure, norm, ref_clip, ref_adamw):
            extra = pure + norm - ref_clip - ref_adamw
            shares = [f"{g['preset']} {g['precision']} a1: {100 * extra / g['timings']['ref a1']['s']:.1f}%"
                      for g in sp.get("groups", []) if g.get("model") == d.get("post_grad_model")
                      and "ref a1" in g.get("timings", {})]
            out.append(f"- Together (norm with the finite check + pure AdamW, against clip_grad_norm_ + AdamW) the "
                       f"functional step spends {_ms(abs(extra))} ms {'more' if extra >= 0 else 'less'} per step "
                       f"after the gradients"
                       + (" = " + ", ".join(shares) + " of the reference step on the same model" if shares else "")
                       + ".\n")
        if sel is not None:
            out.append(f"- A sync-free skip (`tree_select` of new and old state, no `bool(finite)`) would cost "
                       f"{_ms(sel)} ms per step: it removes the compile graph break, not time.\n")
    fold = d.get("fold", {})
    if fold:
        out.append("\n**Step time, the gradients** (forward + backward only):\n")
    for key, v in fold.items():
        names = list(v)
        ref, auto, func = (v[n]["s"] for n in names)
        out.append(f"- {key}: reference {_ms(ref)} ms, functional autograd engine {_ms(auto)} ms "
                   f"({auto / ref:.3f}x), torch.func engine {_ms(func)} ms ({func / ref:.3f}x).\n")
    if fold:
        out.append("- The torch.func engine pays a per-op cost (every tensor wrapped at the transform's level), "
                   "which grows with the number of micro-batches; the autograd engine is the default for that "
                   "reason. The functional fold's own cost per micro-batch (tree flatten / cast / detach of "
                   "every leaf, a fresh gradient tree added into the accumulator) shows at accumulation 8.\n")
    flag = d.get("remat_grads_require_grad")
    remat_rows = _cost_rows(sp, "remat")
    if flag is not None or remat_rows:
        out.append("\n**Remat.** " + ", ".join(f"{c['preset']} {c['precision']}: {c['ratio']:.3f}x"
                                               for c in remat_rows) + ".")
        if flag and flag.get("autograd"):
            out.append(" The gradients that come back through a rematerialised block still require grad under "
                       "the autograd engine: `fm.remat`'s backward recomputes with `torch.func.vjp` on the saved "
                       "inputs as they are (they are the live, requires-grad leaves), so under `enable_grad` "
                       "the outer autograd also records the recomputation and its vjp, and each gradient "
                       "holds its block's recomputed activations until the optimizer is done (the memory table's "
                       "remat row) and autograd records the optimizer's arithmetic on them. Fix "
                       "(`fm.remat`, its autograd function's backward): recompute on `x.detach()` and "
                       "`[leaf.detach() for leaf in leaves]`; outside a torch.func transform a plain "
                       "`torch.autograd.grad` recompute is cheaper still. Defensive second fix "
                       "(`fm.value_and_grad`, the autograd engine): detach the returned gradients.\n")
        else:
            out.append(" Remat's gradients carry no autograd history; the cost is the second forward of each block.\n")
    acc = _cost_rows(sp, "accumulation (8")
    if acc:
        pairs = {}
        for c in acc:
            side = "functional" if "functional" in c["cost"] else "reference"
            pairs.setdefault((c["preset"], c["precision"]), {})[side] = c["ratio"]
        out.append("\n**Accumulation.** 8 micro-batches of 1 row against 1 batch of 8 rows, functional / reference "
                   "cost: " + "; ".join(f"{p} {q}: {v.get('functional', float('nan')):.3f} / "
                                        f"{v.get('reference', float('nan')):.3f}" for (p, q), v in pairs.items())
                   + ". Where the reference pays about as much, the cost comes from the smaller micro-batch (less "
                   "work per kernel call, one optimizer-free pass of Python per micro-batch), not from the fold; "
                   "the 2-micro-batch rows are the closer to compute-bound comparison. Each side is priced against "
                   "its own accumulation-1 step: where the functional one is the faster (bf16 on the CPU, the math "
                   "attention kernel), the same work per micro-batch is a larger ratio; section 1 sets the two "
                   "accumulation-8 steps side by side.\n")
    ls_rows = _cost_rows(sp, "dynamic loss scale")
    if ls_rows:
        out.append("\n**Loss scaling.** " + ", ".join(f"{c['preset']} {c['precision']}: {c['ratio']:.3f}x"
                                                     for c in ls_rows) +
                   ". Its own work is the unscale pass and a few scalar ops of `adjust`; the ratios are "
                   "within run-to-run noise.\n")
    hyg = d.get("hygiene_calls", {}).get("gc.collect()")
    if hyg:
        out.append(f"\n**Memory hygiene.** One `gc.collect()` in this process takes {_ms(hyg['s'])} ms (it walks "
                   "every tracked Python object, most of them from imported modules): hygiene every step adds that "
                   "much to each step, every N steps 1/N of it. What it gives back is in the hygiene table of "
                   "section 4.\n")
    runs = [x for x in (r.get("compile") or {}).get("runs", []) if "func compiled / ref compiled model" in
            x.get("ratios", {})]
    if runs:
        out.append("\n**Compile.** Compiled functional / compiled reference: " + "; ".join(
            f"{x['preset']} {x['precision']}: {x['ratios']['func compiled / ref compiled model']['ratio']:.3f}"
            for x in runs) + ". In float32 both compile the same model math and keep AdamW eager (fused, and "
            "torch's foreach), and on the CPU the steps are bound by the matmuls and SDPA, which inductor leaves as "
            "ATen calls: the two can differ by no more than the rest of the step, where the functional step's "
            "GPT-2 GELU is traced as x * sigmoid(2u), which inductor runs in about half the time of torch's tanh "
            "GELU (`benchmarks/activation_bench.py`). In bfloat16 on the CPU the functional step's attention is "
            "also the math kernel (`ModelConfig.attention='auto'`: SDPA's flash backward is slow there at short "
            "sequences, `benchmarks/attention_kernels.py`), whose scale, bias and softmax inductor fuses; the "
            "reference keeps SDPA, as nanoGPT does.\n")
    return "\n".join(out)
