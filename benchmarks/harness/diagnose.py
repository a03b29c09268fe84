"""Where a functional step's time goes: its pieces timed against their imperative counterparts.

Post-gradient pieces (finite check, norm, optimizer) are timed on a gradient tree of the model's
shapes; the gradient fold (forward + backward over k micro-batches) is timed per engine against
the reference's forward + backward loop; one step is run under cProfile for the Python side.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats

import optree
import torch
import torch.nn.functional as F

import functional_memopt as fm
from functional_memopt.testing.reference import ReferenceGPT

from .runners import LR, WEIGHT_DECAY, Variant, functional_runner
from .timing import interleave
from .trees import tree_all_finite, tree_flatten_with_paths, tree_global_norm, tree_select


def _reference_model(cfg, params):
    model = ReferenceGPT.from_params(params, cfg)
    flat = tree_flatten_with_paths(params)
    for name, p in model.named_parameters():
        key = name[: -len(".weight")] if name in ("wte.weight", "wpe.weight") else name
        p.grad = torch.randn_like(flat[key]) * 1e-3
    return model


def post_grad(cfg: fm.ModelConfig, *, reps: int, device: torch.device, clock: str) -> dict:
    """Median time of each post-gradient piece for the params of ``cfg``."""
    params = fm.init_params(cfg, seed=0, device=device)
    opt = fm.adamw(LR, weight_decay=WEIGHT_DECAY)
    state = fm.init_train_state(params, opt)
    donated = fm.init_train_state(optree.tree_map(torch.clone, params), opt)
    grads = optree.tree_map(lambda p: torch.randn_like(p) * 1e-3, params)
    leaves = optree.tree_leaves(grads)
    found = torch.zeros((), device=device)
    one = torch.ones((), device=device)
    model = _reference_model(cfg, params)
    mparams = list(model.parameters())
    topt = torch.optim.AdamW(mparams, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
    fused_model = _reference_model(cfg, params)
    fused = torch.optim.AdamW(list(fused_model.parameters()), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    finite = torch.ones((), dtype=torch.bool, device=device)

    def pure_pair():
        updates, _ = opt.update(grads, state.opt_state, state.params)
        return fm.apply_updates(state.params, updates)

    pieces = {
        "finite: tree_all_finite (isfinite().all() per leaf, stack)": lambda: tree_all_finite(grads),
        "finite + unscale: torch._amp_foreach_non_finite_check_and_unscale_ (GradScaler's kernel)":
            lambda: torch._amp_foreach_non_finite_check_and_unscale_(leaves, found, one),
        "unscale: torch._foreach_mul_ (the step's current unscale)": lambda: torch._foreach_mul_(leaves, 1.0),
        "global norm: tree_global_norm (_foreach_norm)": lambda: tree_global_norm(grads),
        "reference norm + clip: clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(mparams, 1e9),
        "adamw pure: update_and_apply (the step's route)":
            lambda: fm.update_and_apply(opt, grads, state.opt_state, state.params),
        "adamw donate: update_and_apply, in place (the step's route)":
            lambda: fm.update_and_apply(opt, grads, donated.opt_state, donated.params, donate=True),
        "adamw pair: update + apply_updates, pure (the optax-style route)": pure_pair,
        "reference: torch.optim.AdamW(foreach=True).step": topt.step,
        "torch.optim.AdamW(fused=True).step (one kernel per tensor)": fused.step,
        "tree_select(finite, new state, old state) (a sync-free skip)":
            lambda: tree_select(finite, (state.params, state.opt_state), (donated.params, donated.opt_state)),
    }
    t = interleave(pieces, warmup=2, reps=reps, device=device, clock=clock)
    return {name: {k: v[k] for k in ("s", "wall_s", "user_s", "sys_s")} for name, v in t.items()}


def hygiene_calls(*, reps: int, device: torch.device, clock: str) -> dict:
    """The cost of one memory-hygiene call in this process (its price per step is this / N)."""
    calls = {"gc.collect()": gc.collect}
    if device.type == "cuda":
        calls["torch.cuda.empty_cache()"] = torch.cuda.empty_cache
    t = interleave(calls, warmup=1, reps=reps, device=device, clock=clock)
    return {name: {k: v[k] for k in ("s", "wall_s", "user_s", "sys_s")} for name, v in t.items()}


def gradient_fold(cfg: fm.ModelConfig, batch: fm.Batch, *, accum: int, precision: str, reps: int,
                  device: torch.device, clock: str) -> dict:
    """Forward + backward over ``accum`` micro-batches: functional engines against the reference."""
    params = fm.init_params(cfg, seed=0, device=device)
    policy = {"fp32": "fp32", "bf16": "mixed_bf16"}[precision]
    loss = fm.with_policy(fm.make_loss_fn(cfg), policy)
    factor = torch.tensor(1.0 / batch.tokens.numel(), dtype=torch.float64, device=device)

    def scaled(p, b, f):
        s, c = loss(p, b)
        return s * f.to(s.dtype), (s.detach(), c.detach())

    def functional(engine):
        g = fm.value_and_grad(scaled, has_aux=True, engine=engine)

        def run():
            micro = fm.split_microbatches(batch, accum) if accum > 1 else [batch]
            return fm.accumulate_gradients(lambda p, mb: g(p, mb, factor), params, micro)

        return run

    model = ReferenceGPT.from_params(params, cfg)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def reference():
        for x, y in zip(batch.tokens.tensor_split(accum), batch.targets.tensor_split(accum)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(x)
            (F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum).backward()
        model.zero_grad(set_to_none=True)

    runs = {"reference forward+backward": reference, "functional fold, engine=autograd": functional("autograd"),
            "functional fold, engine=func": functional("func")}
    t = interleave(runs, warmup=1, reps=reps, device=device, clock=clock)
    return {name: {k: v[k] for k in ("s", "wall_s", "user_s", "sys_s")} for name, v in t.items()}


def remat_gradients_carry_history(cfg: fm.ModelConfig, batch: fm.Batch) -> dict:
    """Whether gradients that come back through a rematerialised block still require grad.

    If they do, each gradient holds the autograd graph of its block's recomputation, so every
    recomputed activation stays alive until the gradients are dropped after the optimizer update:
    remat then costs memory instead of saving it, and the optimizer's arithmetic on such gradients
    is recorded by autograd too.
    """
    params = fm.init_params(cfg, seed=0, device=batch.tokens.device)
    loss = fm.make_loss_fn(cfg, remat="all")
    out = {}
    for engine in ("autograd", "func"):
        _, grads = fm.value_and_grad(lambda p, b: loss(p, b)[0], engine=engine)(params, batch)
        out[engine] = any(g.requires_grad for g in optree.tree_leaves(grads))
    return out


def profile_step(cfg: fm.ModelConfig, batch: fm.Batch, *, accum: int, top: int = 12) -> list[dict]:
    """cProfile of two functional steps after one warm-up: the functions with most own time."""
    params = fm.init_params(cfg, seed=0, device=batch.tokens.device)
    run = functional_runner(cfg, params, batch, Variant(accum=accum))
    run()
    prof = cProfile.Profile()
    prof.enable()
    run()
    run()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():
        where = fn if file == "~" else f"{file.rsplit('/', 2)[-2:][-1]}:{line}({fn})"
        rows.append(dict(function=where, calls=nc // 2, own_s=tt / 2, cumulative_s=ct / 2))
    rows.sort(key=lambda r: -r["own_s"])
    return rows[:top]


def run_diagnostics(cfg_post: fm.ModelConfig, cfg_fold: fm.ModelConfig, batch: fm.Batch, *, reps: int,
                    precisions: tuple = ("fp32", "bf16"), device: torch.device, clock: str, log) -> dict:
    """All diagnostics: post-gradient pieces, gradient folds at accumulation 1 and 8, a profile."""
    log("diagnostics: post-gradient pieces")
    out = {"post_grad_model": cfg_post.to_dict(), "post_grad": post_grad(cfg_post, reps=reps, device=device,
                                                                          clock=clock)}
    out["hygiene_calls"] = hygiene_calls(reps=reps, device=device, clock=clock)
    out["fold_batch"] = list(batch.tokens.shape)
    out["fold"] = {}
    for precision in precisions:
        for accum in (1, 8):
            log(f"diagnostics: gradient fold {precision} a{accum}")
            out["fold"][f"{precision} a{accum}"] = gradient_fold(cfg_fold, batch, accum=accum, precision=precision,
                                                                 reps=reps, device=device, clock=clock)
    out["remat_grads_require_grad"] = remat_gradients_carry_history(cfg_fold, batch)
    log("diagnostics: cProfile of a functional step (a8)")
    out["profile_a8"] = profile_step(cfg_fold, batch, accum=8)
    return out
