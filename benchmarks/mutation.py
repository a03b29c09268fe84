"""The mutation score of the core math: mutmut over the modules of ``[tool.mutmut]`` in pyproject.toml.

Run from the repository root (needs ``pip install -e .[dev]``, which brings mutmut):

    python benchmarks/mutation.py                          # every core module
    python benchmarks/mutation.py train/accumulate.py      # one module (or several)
    python benchmarks/mutation.py --sample 5 train/step.py # every fifth mutant (numbers ending in 0 or 5)
    python benchmarks/mutation.py --report                 # the score of what has run, no new run

Each mutant is a small change to the source (an operator, a constant, an argument dropped); it is
killed when a test of ``pytest_add_cli_args_test_selection`` fails on it. The tests run with
``HYPOTHESIS_PROFILE=mutation`` (tests/conftest.py): derandomized, so the same examples run every
time and the score can be rerun. The score is killed / (all - equivalent), where EQUIVALENT below
lists the mutants that cannot change any result, each with its reason (ARCHITECTURE.md, "Mutants
left alive, and why"). Results accumulate in ``mutants/`` (mutmut reruns only what changed), and the
report goes to stdout and benchmarks/out/mutation.json. CI does not run this: a full run takes
hours on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}

# Mutants that compute the same results as the original, by name (mutmut's names are stable while
# the function's source is unchanged), with the reason.
EQUIVALENT: dict[str, str] = {
    "functional_memopt.model.attention.x_build_attention_mask__mutmut_10":
        "a strictly lower causal mask: the diagonal it drops is put back by the final `mask | eye`",
    "functional_memopt.model.attention.x_positions_from_segments__mutmut_5":
        "arange(T).expand(T) instead of expand(B, T): torch.where and the subtraction broadcast it to the same (B, T)",
    "functional_memopt.train.step.x_make_train_step__mutmut_65":
        "the factor left float64: the value is float64, but its gradient reaches the loss sum rounded once from "
        "float64 to the loss's dtype, as factor.to(dtype) rounds it; the value itself is never read",
    "functional_memopt.train.step.x_make_train_step__mutmut_150":
        "NoOpLossScale's scale is exactly 1.0, so scale.double() / total is 1.0 / total bit for bit",
    "functional_memopt.optim.adamw_kernel.x__fused__mutmut_80":
        "zeros_like of a gradient the fused route requires contiguous: preserve_format gives the contiguous layout",
}


def _modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


_LAST_DIGITS = {1: "", 2: "[02468]", 5: "[05]", 10: "0"}  # --sample n: mutant numbers ending so


def _glob(module: str, sample: int = 1) -> str:
    path = module if module.startswith("functional_memopt/") else f"functional_memopt/{module}"
    base = path.removesuffix(".py").replace("/", ".") + ".*"
    return base if sample == 1 else base + "__mutmut_*" + _LAST_DIGITS[sample]


def _in_sample(name: str, sample: int) -> bool:
    return sample == 1 or int(name.rsplit("_", 1)[1]) % sample == 0


def _status(code) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def report(modules: list[str], sample: int = 1) -> dict:
    """Per module and in all: mutants, caught, survived (with names), not run, equivalent, score."""
    out: dict = {"modules": {}, "equivalent": EQUIVALENT, "sample": sample}
    totals = dict(mutants=0, caught=0, equivalent=0, not_run=0)
    for module in modules:
        meta = ROOT / "mutants" / (module + ".meta")
        if not meta.exists():
            continue
        codes = {n: c for n, c in json.loads(meta.read_text())["exit_code_by_key"].items() if _in_sample(n, sample)}
        statuses = {name: _status(code) for name, code in codes.items()}
        caught = sorted(n for n, s in statuses.items() if s in CAUGHT)
        equivalent = sorted(n for n, s in statuses.items() if n in EQUIVALENT and s not in CAUGHT)
        not_run = sorted(n for n, s in statuses.items() if s == "not checked")
        alive = sorted(n for n, s in statuses.items() if s not in CAUGHT and n not in EQUIVALENT and s != "not checked")
        run = len(statuses) - len(not_run)
        score = len(caught) / max(1, run - len(equivalent))
        out["modules"][module] = dict(mutants=len(statuses), run=run, caught=len(caught), equivalent=len(equivalent),
                                      survived=alive, score=round(score, 4))
        totals["mutants"] += len(statuses)
        totals["caught"] += len(caught)
        totals["equivalent"] += len(equivalent)
        totals["not_run"] += len(not_run)
    run = totals["mutants"] - totals["not_run"]
    totals["score"] = round(totals["caught"] / max(1, run - totals["equivalent"]), 4)
    out["total"] = totals
    return out


def _print(result: dict) -> None:
    print(f"{'module':42} {'mutants':>8} {'run':>6} {'caught':>7} {'equiv':>6} {'alive':>6} {'score':>7}")
    for module, r in result["modules"].items():
        print(f"{module:42} {r['mutants']:>8} {r['run']:>6} {r['caught']:>7} {r['equivalent']:>6} "
              f"{len(r['survived']):>6} {r['score']:>7.1%}")
    t = result["total"]
    print(f"{'all':42} {t['mutants']:>8} {t['mutants'] - t['not_run']:>6} {t['caught']:>7} {t['equivalent']:>6} "
          f"{'':>6} {t['score']:>7.1%}")
    for module, r in result["modules"].items():
        for name in r["survived"]:
            print(f"  alive: {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="modules under functional_memopt/ (default: every core module)")
    parser.add_argument("--report", action="store_true", help="only report what has run")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    parser.add_argument("--sample", type=int, default=1, choices=sorted(_LAST_DIGITS),
                        help="run and report every n-th mutant of each function (by number): a reproducible subset")
    args = parser.parse_args(argv)
    modules = _modules()
    chosen = [m if m.startswith("functional_memopt/") else f"functional_memopt/{m}" for m in args.modules] or modules
    unknown = sorted(set(chosen) - set(modules))
    if unknown:
        parser.error(f"not a core module of [tool.mutmut]: {unknown}; choose from {modules}")
    if not args.report:
        env = dict(os.environ, HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "mutation"))
        env.pop("PYTHONPATH", None)  # mutmut puts its mutated copy first; the original must not shadow it
        # mutmut forks its workers from a server that has imported torch: with an OpenMP thread pool
        # alive in the parent, a forked child hangs in its first parallel region. One thread each.
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
        cmd += [] if chosen == modules and args.sample == 1 else [_glob(m, args.sample) for m in chosen]
        subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    result = report(chosen, args.sample)
    _print(result)
    out = ROOT / "benchmarks" / "out" / "mutation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
