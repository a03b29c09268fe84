"""The benchmark: functional step against the imperative recipe, technique costs, compile, memory.

Run from the repository root:
    python benchmarks/run.py                 # full CPU run (about 30 minutes on 2 cores, half of it compiling)
    python benchmarks/run.py --quick         # a reduced run, well under a minute
    python benchmarks/run.py --device cuda   # the CUDA run (benchmarks/gpu_check.sh calls it)

Writes results.json, RESULTS.md and growth.png into --out (default: this folder): this one command
regenerates them all. Every figure in RESULTS.md comes from results.json; nothing is written by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import functional_memopt  # noqa: F401
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402

import functional_memopt as fm  # noqa: E402
from harness import report  # noqa: E402
from harness.spawn import emit, spawn  # noqa: E402
from harness.timing import primary_clock  # noqa: E402

SMOKE = dict(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32)  # the harness's own test


def plan_for(mode: str, device: torch.device) -> dict:
    """What each section runs for a mode ("full", "quick", "smoke") on a device."""
    tiny, small = fm.get_config("tiny"), fm.get_config("small")
    smoke = fm.ModelConfig(**SMOKE)
    if device.type == "cuda":
        gpt2 = fm.get_config("gpt2")
        return dict(
            speed_models=(("tiny", tiny, 8, 128, True, 2, 5), ("gpt2", gpt2, 8, 1024, False, 2, 5)),
            precisions=("fp32", "bf16", "fp16"),
            post_grad_cfg=gpt2, fold=(tiny, 8, 128), diag_reps=7, fold_precisions=("fp32", "bf16"),
            memory=(gpt2, 8, 1024, 8), hygiene_steps=4, compile=None,
            gpu=dict(preset="gpt2", rows=16, seq=1024, reps=5), budget=330)
    if mode == "smoke":
        return dict(speed_models=(("smoke", smoke, 8, 16, False, 1, 2),), precisions=("fp32", "bf16"),
                    post_grad_cfg=smoke, fold=(smoke, 8, 16), diag_reps=2, fold_precisions=("fp32",),
                    memory=(smoke, 8, 16, 4), memory_rows=2, hygiene_steps=2, compile=None, gpu=None, budget=120)
    if mode == "quick":
        return dict(speed_models=(("tiny", tiny, 8, 64, False, 1, 3),), precisions=("fp32", "bf16"),
                    post_grad_cfg=tiny, fold=(tiny, 8, 64), diag_reps=3, fold_precisions=("fp32",),
                    memory=(tiny, 16, 64, 8), memory_rows=2, hygiene_steps=2, compile=None, gpu=None, budget=50)
    # Rounds: between runs of the same code, tiny fp32's compile ratio moved by up to 10% at 5
    # rounds (0.99-1.12) and its a1 step ratio by 3% at 7 (1.00-1.03); the targets decide on less.
    return dict(speed_models=(("tiny", tiny, 8, 128, True, 2, 13), ("small", small, 8, 128, False, 1, 5)),
                precisions=("fp32", "bf16"), post_grad_cfg=small, fold=(tiny, 8, 128), diag_reps=7,
                fold_precisions=("fp32", "bf16"), memory=(tiny, 32, 128, 8), hygiene_steps=4,
                compile=[("tiny", tiny, 8, 128, 11, p) for p in ("fp32", "bf16")]
                + [("small", small, 8, 128, 5, p) for p in ("fp32", "bf16")], gpu=None, budget=1800)


def machine_info(device: torch.device, threads: int, clock: str, argv: list[str]) -> dict:
    """Machine, versions, date and command of this run (no host names or paths)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), machine=platform.machine(), system=platform.system(),
                python=platform.python_version(), torch=torch.__version__, device=device.type, threads=threads,
                clock=clock, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python benchmarks/run.py" + "".join(" " + shlex.quote(a) for a in argv),
                cpu_capability=torch.backends.cpu.get_cpu_capability())
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def guarded(results: dict, key: str, fn, log) -> None:
    """``results[key] = fn()``, or the error, so one failing section never ends the benchmark."""
    try:
        results[key] = fn()
    except Exception as err:  # recorded in the results and the report
        import traceback

        log(f"{key}: FAILED {type(err).__name__}: {err}")
        results[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run, well under a minute on the CPU")
    parser.add_argument("--smoke", action="store_true", help="a microscopic run that checks the harness only")
    parser.add_argument("--out", default=HERE, help="folder for results.json and RESULTS.md (default: benchmarks/)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on the CPU, so CPU time measures work alone)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget; late sections shrink or skip")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: speed,diagnostics,memory,compile,gpu,growth,floor,"
                             "chunked")
    parser.add_argument("--only", default="",
                        help="comma-separated sections to run again; the others are kept from the results.json "
                             "already in --out, and RESULTS.md is regenerated from the whole")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, json.loads(args.spec))

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; run on the CPU or on a GPU machine.")
    threads = args.threads or (1 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = plan_for(mode, device)
    budget = args.budget_s or plan["budget"]
    start = time.monotonic()
    deadline = start + budget
    clock = primary_clock(device, threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {"meta": machine_info(device, threads, clock, argv), "mode": mode, "budget_s": budget}

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - start:6.1f} s] {msg}", flush=True)

    def speed():
        from harness.speed import SpeedPlan, run_speed

        share = 0.45 if device.type == "cpu" else 0.25
        return run_speed(SpeedPlan(plan["speed_models"], plan["precisions"]), device=device, clock=clock,
                         deadline=time.monotonic() + share * budget, log=log)

    def diagnostics():
        from harness.diagnose import run_diagnostics

        cfg_fold, rows, seq = plan["fold"]
        batch = fm.sample_batch(fm.load_corpus(), rows, seq, seed=0, index=0, device=device)
        return run_diagnostics(plan["post_grad_cfg"], cfg_fold, batch, reps=plan["diag_reps"],
                               precisions=plan["fold_precisions"], device=device, clock=clock, log=log)

    def memory():
        from harness.memory import run_memory

        cfg_mem, rows, seq, accum = plan["memory"]
        return run_memory(cfg_mem, rows, seq, accum=accum, device=device, threads=threads,
                          hygiene_steps=plan["hygiene_steps"], max_rows=plan.get("memory_rows"),
                          timeout=max(60.0, deadline - time.monotonic()), log=log)

    def gpu():
        if not plan["gpu"]:
            return {"skipped": "needs a CUDA device (python benchmarks/run.py --device cuda)"}
        left = deadline - time.monotonic()
        log(f"gpu: starting in a fresh process ({left:.0f} s left)")
        # The GPU figures matter most on a GPU machine, so they run first there and get most of the budget.
        return spawn("gpu", dict(plan["gpu"], threads=threads), timeout=max(120.0, 0.6 * left))

    def compile_():
        if not plan["compile"]:
            why = {"smoke": "--smoke", "quick": "--quick"}.get(mode, "on CUDA the gpu section compiles GPT-2")
            return {"skipped": why}
        runs = []
        for preset, cfg_c, rows, seq, reps, precision in plan["compile"]:
            left = deadline - time.monotonic()
            if left < 60:
                runs.append({"preset": preset, "precision": precision,
                             "error": f"skipped: time budget ({left:.0f} s left of {budget:.0f} s)"})
                continue
            log(f"compile: {preset} {precision} in a fresh process ({left:.0f} s left)")
            spec = dict(cfg=cfg_c.to_dict(), rows=rows, seq=seq, reps=reps, device=device.type, threads=threads,
                        precision=precision)
            res = spawn("compile", spec, timeout=left)
            runs.append({"preset": preset, "precision": precision, **res})
        return {"runs": runs}

    def growth_():
        if mode != "full" or device.type != "cpu":
            return {"skipped": "the full CPU run only (python benchmarks/growth.py runs it alone)"}
        import growth

        rows = []
        for axis in growth.AXES:
            for p in growth.points(axis):
                log(f"growth: {p['series']} = {p.get('label', p['x'])}")
                rows.append(growth.measure(p, warmup=1, reps=3))
        result = {"rows": rows, "exponents": growth.exponents(rows), "chart": "growth.png"}
        try:
            growth.chart(result, os.path.join(args.out, "growth.png"))
        except ImportError:
            result["chart"] = None
        return result

    def script(name: str, argv: list[str], json_name: str, chart: str | None = None, least_s: float = 600.0) -> dict:
        """Run benchmarks/<name> in a fresh process; its JSON (and chart) land in --out."""
        import subprocess

        path = os.path.join(args.out, json_name)
        cmd = [sys.executable, os.path.join(HERE, name), *argv, "--out", path]
        if chart:
            cmd += ["--chart", os.path.join(args.out, chart)]
        left = deadline - time.monotonic()
        log(f"{name}: {' '.join(shlex.quote(a) for a in argv)} ({left:.0f} s left)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(HERE),
                                                                        os.environ.get("PYTHONPATH")) if p))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(least_s, left), env=env)
        if done.returncode:
            return {"error": f"{name} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
        with open(path) as f:
            out = json.load(f)
        out["command"] = f"python benchmarks/{name} {' '.join(argv)}"
        if chart:
            out["chart"] = chart
        return out

    def floor():
        if mode != "full" or device.type != "cpu":
            return {"skipped": "the full CPU run only (python benchmarks/memory_floor.py runs it alone)"}
        rows, seq, accum = 2, 128, 2  # GPT-2 at a shape whose tracked steps take a few minutes a row here
        chart = "memory_floor.png"
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            chart = None
        return script("memory_floor.py", ["--batch-size", str(rows), "--seq-len", str(seq), "--accum-steps",
                                          str(accum), "--threads", str(max(threads, 2))], "memory_floor.json", chart,
                      least_s=3600.0)  # it may run past the budget (about five minutes here)

    def chunked():
        if mode != "full" or device.type != "cpu":
            return {"skipped": "the full CPU run only (python benchmarks/chunked_loss_bench.py runs it alone)"}
        # bf16 matmuls are emulated on CPUs without bf16 instructions (ten times slower): fp32 there.
        policy = "mixed_bf16" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "fp32"
        return script("chunked_loss_bench.py", ["--repeats", "5", "--policy", policy], "chunked_loss.json",
                      least_s=1800.0)  # GPT-2 at 2 x 1024: a few minutes

    sections = {"speed": speed, "diagnostics": diagnostics, "memory": memory, "gpu": gpu, "compile": compile_,
                "growth": growth_, "floor": floor, "chunked": chunked}
    order = ["gpu", "speed", "diagnostics", "memory", "compile"] if device.type == "cuda" else list(sections)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sorted((only | skip) - set(sections))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(sections)}")
    if only:
        previous = os.path.join(args.out, "results.json")
        if not os.path.exists(previous):
            parser.error(f"--only keeps the other sections from {previous}, which does not exist; run without --only")
        with open(previous) as f:
            kept = json.load(f)
        results.update({k: v for k, v in kept.items() if k in sections and k not in only})
        results["meta"]["kept_from_previous_run"] = sorted(k for k in sections if k not in only and k in kept)
        results["meta"]["section_runs"] = report.kept_section_runs(kept.get("meta", {}),
                                                                   results["meta"]["kept_from_previous_run"])
    for name in order:
        if only and name not in only:
            continue
        if name in skip:
            results[name] = {"skipped": "--skip"}
        else:
            guarded(results, name, sections[name], log)
    results["meta"]["elapsed_s"] = time.monotonic() - start
    scrub = {os.path.dirname(HERE) + os.sep: "", sys.prefix: "<python>", os.path.abspath(args.out): "<out>",
             os.path.expanduser("~"): "~"}
    results = report.jsonable(results, scrub)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(report.markdown(results))
    log(f"wrote {os.path.join(args.out, 'results.json')} and RESULTS.md")
    return 0


def run_worker(task: str, spec: dict) -> int:
    """The body of a fresh process started by harness.spawn: one task, its JSON result on stdout."""
    torch.set_num_threads(spec.get("threads", 1))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if task == "memory":
        from harness.memory import memory_worker

        emit(memory_worker(spec))
    elif task == "compile":
        from harness.compiled import compile_benchmark
        from harness.timing import primary_clock as clock_for

        device = torch.device(spec["device"])
        cfg = fm.ModelConfig.from_dict(spec["cfg"])
        batch = fm.sample_batch(fm.load_corpus(), spec["rows"], spec["seq"], seed=0, index=0, device=device)
        emit(compile_benchmark(cfg, batch, precision=spec["precision"], reps=spec["reps"], device=device,
                               clock=clock_for(device, spec["threads"]), log=log, emit=emit))
    elif task == "gpu":
        from harness.gpu import gpu_benchmark

        emit(gpu_benchmark(spec, log, emit=emit))
    else:
        raise SystemExit(f"run.py --worker: unknown task {task!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
