"""Figure 3: ``torch.compile`` of the functional step against eager and the compiled reference.

Runs in its own process (see run.py) so a crash or a long compilation cannot take the whole
benchmark down. First, ``torch._dynamo.explain`` (tracing only, no code generation) counts the
graphs and graph breaks of the step under each gradient engine. Then four runners are timed:
the eager functional step, the compiled functional step (the engine with fewest breaks), the
eager reference and the reference with a compiled model; the first call of a compiled runner is
timed apart as its compile time.
"""

from __future__ import annotations

import time
import traceback

import torch

import functional_memopt as fm

from .runners import LR, MAX_GRAD_NORM, WEIGHT_DECAY, Variant, make_runner
from .timing import interleave, ratio


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line[:limit]


def explain_step(cfg: fm.ModelConfig, batch: fm.Batch, engine: str, precision: str) -> dict:
    """Graphs and graph breaks dynamo sees in one functional step (no inductor code generation)."""
    policy = {"fp32": "fp32", "bf16": "mixed_bf16"}[precision]
    opt = fm.adamw(LR, weight_decay=WEIGHT_DECAY)
    state = fm.init_train_state(fm.init_params(cfg, seed=0, device=batch.tokens.device), opt, policy=policy)
    step = fm.make_train_step(cfg, opt, policy=policy, max_grad_norm=MAX_GRAD_NORM, engine=engine)
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(step)(state, batch)
    except Exception as err:  # report, never crash the benchmark
        return {"error": f"{type(err).__name__}: {_first_line(err)}"}
    reasons = []
    for br in ex.break_reasons:
        where = ""
        if getattr(br, "user_stack", None):
            frame = br.user_stack[-1]
            where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
        reasons.append({"reason": _first_line(br.reason), "at": where})
    unique = []
    for r in reasons:
        if r not in unique:
            unique.append(r)
    return {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count, "op_count": ex.op_count,
            "break_reasons": unique}


def _timed_first_call(fn) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}


def compile_benchmark(cfg: fm.ModelConfig, batch: fm.Batch, *, precision: str, reps: int, device: torch.device,
                      clock: str, log, emit=None) -> dict:
    """Explain both engines, then time eager / compiled functional and reference steps.

    ``emit(out)`` receives the results so far after the (cheap) explain stage.
    """
    out: dict = {"model": cfg.to_dict(), "batch": list(batch.tokens.shape), "precision": precision, "explain": {}}
    for engine in ("autograd", "func"):
        log(f"compile: explain engine={engine}")
        out["explain"][engine] = explain_step(cfg, batch, engine, precision)
    counts = {e: r.get("graph_break_count", 10**9) for e, r in out["explain"].items()}
    engine = min(counts, key=lambda e: (counts[e], e != "func"))
    out["compiled_engine"] = engine
    out["compile_time"], out["errors"], out["timings"], out["ratios"] = {}, {}, {}, {}
    if emit:
        emit(out)
    torch._dynamo.reset()
    params = fm.init_params(cfg, seed=0, device=device)
    specs = {
        "func eager": Variant(precision=precision),
        f"func compiled (engine={engine})": Variant(precision=precision, engine=engine, compile=True),
        "ref eager": Variant(kind="ref", precision=precision),
        "ref compiled model": Variant(kind="ref", precision=precision, compile=True),
    }
    runners = {}
    for name, v in specs.items():
        try:
            run = make_runner(cfg, params, batch, v)
            if v.compile:
                log(f"compile: compiling {name}")
                out["compile_time"][name] = _timed_first_call(run)
            runners[name] = run
        except Exception as err:
            out["errors"][name] = f"{type(err).__name__}: {_first_line(err)}"
            out.setdefault("tracebacks", {})[name] = traceback.format_exc()[-2000:]
    log("compile: timing")
    t = interleave(runners, warmup=2, reps=reps, device=device, clock=clock)
    keep = ("s", "clock", "wall_s", "user_s", "sys_s", "reps")
    out["timings"] = {k: {kk: v[kk] for kk in keep} for k, v in t.items()}
    ratios = {}
    cname = f"func compiled (engine={engine})"
    for a, b in [(cname, "func eager"), (cname, "ref compiled model"), ("ref compiled model", "ref eager"),
                 ("func eager", "ref eager")]:
        if a in t and b in t:
            ratios[f"{a} / {b}"] = ratio(t, a, b)
    out["ratios"] = ratios
    from torch._dynamo.utils import counters

    out["graph_breaks_seen"] = {_first_line(k, 160): v for k, v in counters["graph_break"].items()}
    return out
