"""Figure 3: the compiled functional step (``make_train_step(compile=True)``) against the compiled reference.

Runs in its own process per model and precision (see run.py), so a crash or a long compilation
cannot take the whole benchmark down. Four runners are timed, interleaved: the eager functional
step, the compiled one (the differentiated loss compiled, forward and backward together, under the
default autograd engine; the fold, the skip decision and the fused AdamW eager), the eager
reference and the reference with a compiled model (``torch.compile(model)``, its optimizer eager
too). The first call of a compiled runner is timed apart as its compile time, and dynamo's graph
count is read before and after the timed steps: recompiles after the first step would show there.
"""

from __future__ import annotations

import time
import traceback

import torch

import functional_memopt as fm

from .runners import Variant, make_runner
from .timing import interleave, ratio


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line[:limit]


def _timed_first_call(fn) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}


def compile_benchmark(cfg: fm.ModelConfig, batch: fm.Batch, *, precision: str, reps: int, device: torch.device,
                      clock: str, log, emit=None) -> dict:
    """Time eager / compiled functional and reference steps; ``emit(out)`` gets the results so far."""
    from torch._dynamo.utils import counters

    out: dict = {"model": cfg.to_dict(), "batch": list(batch.tokens.shape), "precision": precision,
                 "compile_time": {}, "errors": {}, "timings": {}, "ratios": {}}
    torch._dynamo.reset()
    params = fm.init_params(cfg, seed=0, device=device)
    specs = {
        "func eager": Variant(precision=precision),
        "func compiled": Variant(precision=precision, compile=True),
        "ref eager": Variant(kind="ref", precision=precision),
        "ref compiled model": Variant(kind="ref", precision=precision, compile=True),
    }
    runners = {}
    for name, v in specs.items():
        try:
            run = make_runner(cfg, params, batch, v)
            if v.compile:
                log(f"compile: compiling {name} ({cfg.n_layer} layers, width {cfg.n_embd}, {precision})")
                out["compile_time"][name] = _timed_first_call(run)
            runners[name] = run
        except Exception as err:
            out["errors"][name] = f"{type(err).__name__}: {_first_line(err)}"
            out.setdefault("tracebacks", {})[name] = traceback.format_exc()[-2000:]
        if emit:
            emit(out)
    graphs = dict(counters["stats"])
    log("compile: timing")
    t = interleave(runners, warmup=1, reps=reps, device=device, clock=clock)
    keep = ("s", "clock", "wall_s", "user_s", "sys_s", "reps")
    out["timings"] = {k: {kk: v[kk] for kk in keep} for k, v in t.items()}
    out["graphs_compiled_after_first_call"] = counters["stats"].get("unique_graphs", 0) - graphs.get("unique_graphs", 0)
    for a, b in [("func compiled", "ref compiled model"), ("func compiled", "func eager"),
                 ("ref compiled model", "ref eager"), ("func eager", "ref eager")]:
        if a in t and b in t:
            out["ratios"][f"{a} / {b}"] = ratio(t, a, b)
    out["graph_breaks_seen"] = {_first_line(k, 160): v for k, v in counters["graph_break"].items()}
    return out
