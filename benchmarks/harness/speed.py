"""Figures 1 and 2: step time of the functional step against the imperative recipe, and the time
cost of each technique (remat, accumulation, loss scaling, memory hygiene, engine, policy route).

For each (model, precision) one group of runners is timed interleaved, so every ratio inside a
group compares steps that ran side by side on the same data.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

import functional_memopt as fm

from .runners import Variant, describe, make_runner
from .timing import interleave, ratio

STEP_TARGET = 1.00  # the plain functional step / the reference, at accumulation 1
STEP_TARGET_ACCUM = 1.05  # ... at accumulation > 1 (each micro-batch's fold and casts are Python work)
REMAT_TARGET = 1.35
ACCUM_TARGET = 1.10
LOSS_SCALE_TARGET = 1.03


def group_variants(precision: str, *, extended: bool, device: torch.device) -> dict[str, Variant]:
    """The runners of one group: reference and functional at accumulation 1 and 8, plus variants."""
    V = lambda **kw: Variant(precision=precision, **kw)  # noqa: E731
    runs = {"ref a1": V(kind="ref"), "func a1": V(), "ref a8": V(kind="ref", accum=8), "func a8": V(accum=8),
            "ref a2": V(kind="ref", accum=2), "func a2": V(accum=2)}
    if precision == "bf16":
        runs["func a1 autocast"] = V(policy_mode="autocast")
        if extended:
            runs["func a8 autocast"] = V(accum=8, policy_mode="autocast")
    if precision != "fp16":
        runs["func a1 remat=all"] = V(remat="all")
        runs["func a1 loss-scale"] = V(loss_scale=True)
    if extended:
        runs["func a1 engine=func"] = V(engine="func")
        runs["func a8 engine=func"] = V(accum=8, engine="func")
        runs["func a1 donate"] = V(donate=True)
        if precision == "fp32":
            runs["func a1 hygiene/1"] = V(hygiene_every=1)
    return runs


def _cost(kind: str, group: dict, t: dict, a: str, b: str, target: float | None, **extra) -> dict | None:
    if a not in t or b not in t:
        return None
    r = ratio(t, a, b)
    row = dict(cost=kind, preset=group["preset"], precision=group["precision"], numerator=a, denominator=b,
               numerator_s=t[a]["s"], denominator_s=t[b]["s"], **r, target=target, **extra)
    row["met"] = None if target is None else bool(r["ratio"] <= target)
    return row


def run_group(preset: str, cfg: fm.ModelConfig, batch: fm.Batch, precision: str, *, extended: bool,
              warmup: int, reps: int, device: torch.device, clock: str, deadline: float | None) -> dict:
    """Time one group; returns its timings, the functional/reference rows and the cost rows."""
    params = fm.init_params(cfg, seed=0, device=device)
    variants = group_variants(precision, extended=extended, device=device)
    runners = {name: make_runner(cfg, params, batch, v) for name, v in variants.items()}
    t0 = time.monotonic()
    timings = interleave(runners, warmup=warmup, reps=reps, device=device, clock=clock, deadline=deadline)
    group = dict(preset=preset, precision=precision, model=cfg.to_dict(), batch=list(batch.tokens.shape),
                 warmup=warmup, seconds=time.monotonic() - t0, variants={k: describe(v) for k, v in variants.items()})
    rows = []
    for name, v in variants.items():
        if v.kind != "func":
            continue
        ref = f"ref a{v.accum}"
        r = ratio(timings, name, ref)
        # Targets for the steps the library recommends (plain, and donated as memopt train runs it);
        # the other variants' cost is in the cost table, against the plain step.
        plain = name in (f"func a{v.accum}", "func a1 donate")
        target = (STEP_TARGET if v.accum == 1 else STEP_TARGET_ACCUM) if plain else None
        rows.append(dict(preset=preset, precision=precision, accum=v.accum, variant=name, reference=ref,
                         func_s=timings[name]["s"], ref_s=timings[ref]["s"], **r, target=target,
                         met=None if target is None else bool(r["ratio"] <= target), reps=timings[name]["reps"],
                         wall_ratio=timings[name]["wall_s"] / timings[ref]["wall_s"],
                         min_ratio=min(timings[name][clock]) / min(timings[ref][clock]),
                         func_sys_s=timings[name].get("sys_s"), ref_sys_s=timings[ref].get("sys_s")))
    costs = [
        _cost("remat (all blocks / none)", group, timings, "func a1 remat=all", "func a1", REMAT_TARGET),
        _cost("accumulation (8 x b/8 / 1 x b), functional", group, timings, "func a8", "func a1", ACCUM_TARGET),
        _cost("accumulation (8 x b/8 / 1 x b), reference", group, timings, "ref a8", "ref a1", None),
        _cost("accumulation (2 x b/2 / 1 x b), functional", group, timings, "func a2", "func a1", ACCUM_TARGET),
        _cost("accumulation (2 x b/2 / 1 x b), reference", group, timings, "ref a2", "ref a1", None),
        _cost("dynamic loss scale (on / off)", group, timings, "func a1 loss-scale", "func a1", LOSS_SCALE_TARGET),
        _cost("memory hygiene every step (on / off)", group, timings, "func a1 hygiene/1", "func a1", None),
        _cost("engine func / autograd, a1", group, timings, "func a1 engine=func", "func a1", None),
        _cost("engine func / autograd, a8", group, timings, "func a8 engine=func", "func a8", None),
        _cost("policy autocast / cast, a1", group, timings, "func a1 autocast", "func a1", None),
        _cost("policy autocast / cast, a8", group, timings, "func a8 autocast", "func a8", None),
        _cost("donate / pure", group, timings, "func a1 donate", "func a1", None),
    ]
    slim = {k: {kk: vv for kk, vv in t.items()} for k, t in timings.items()}
    return dict(group=group, timings=slim, rows=rows, costs=[c for c in costs if c is not None])


@dataclasses.dataclass(frozen=True)
class SpeedPlan:
    """Which models and precisions the speed section times, and how many rounds."""

    models: tuple  # ((preset name, ModelConfig, batch rows, seq len, extended, warmup, reps), ...)
    precisions: tuple  # ("fp32", "bf16", ...)


def run_speed(plan: SpeedPlan, *, device: torch.device, clock: str, deadline: float | None, log) -> dict:
    """All groups of the plan; the rows of every group concatenated."""
    data = fm.load_corpus()
    out: dict[str, Any] = {"groups": [], "step_time": [], "costs": []}
    for name, cfg, rows, seq, extended, warmup, reps in plan.models:
        batch = fm.sample_batch(data, rows, seq, seed=0, index=0, device=device)
        for precision in plan.precisions:
            log(f"speed: {name} {precision} (batch {rows}x{seq})")
            res = run_group(name, cfg, batch, precision, extended=extended, warmup=warmup, reps=reps,
                            device=device, clock=clock, deadline=deadline)
            out["groups"].append(dict(res["group"], timings=res["timings"]))
            out["step_time"] += res["rows"]
            out["costs"] += res["costs"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out
