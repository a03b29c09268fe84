"""One training step as a zero-argument callable, functional or imperative, holding its own state."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optree
import torch

import functional_memopt as fm
from functional_memopt.testing.reference import ImperativeTrainer, ReferenceGPT

LR = 1e-4  # small enough that a fixed batch repeated for a few steps never diverges
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0  # both sides clip, as a real run would

# precision name -> (functional policy, needs a loss scale)
PRECISIONS = {"fp32": ("fp32", False), "bf16": ("mixed_bf16", False), "fp16": ("mixed_fp16", True)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one runner trains: the functional step's options, or the imperative reference."""

    kind: str = "func"  # "func" (make_train_step) or "ref" (ImperativeTrainer)
    precision: str = "fp32"  # a key of PRECISIONS
    accum: int = 1  # micro-batches per step
    engine: str = "autograd"  # functional gradient engine
    policy_mode: str = "cast"  # functional precision route
    remat: Any = None  # functional remat spec
    donate: bool = False  # functional in-place state update
    loss_scale: bool | None = None  # None: the precision's default (dynamic for fp16 only)
    hygiene_every: int = 0  # gc + cache clearing every N steps (0: off)
    compile: bool = False  # make_train_step(compile=True) / torch.compile of the reference model


class FunctionalRunner:
    """One functional step per call on a fixed batch; ``state`` is the current TrainState."""

    def __init__(self, cfg: fm.ModelConfig, params: Any, batch: fm.Batch, v: Variant):
        policy, needs_scale = PRECISIONS[v.precision]
        device = batch.tokens.device
        use_scale = needs_scale if v.loss_scale is None else v.loss_scale
        opt = fm.adamw(LR, weight_decay=WEIGHT_DECAY)
        own = optree.tree_map(torch.clone, params)  # a donating runner writes into its params
        ls = fm.dynamic_loss_scale(device=device) if use_scale else None
        self.state = fm.init_train_state(own, opt, loss_scale=ls, policy=policy)
        step = fm.make_train_step(cfg, opt, policy=policy, accum_steps=v.accum, remat=v.remat,
                                  max_grad_norm=MAX_GRAD_NORM, donate=v.donate, engine=v.engine,
                                  policy_mode=v.policy_mode, compile=v.compile)
        if v.hygiene_every:
            step = fm.with_memory_hygiene(step, gc_every=v.hygiene_every, stats=False)
        self.step, self.batch = step, batch

    def __call__(self) -> dict:
        self.state, metrics = self.step(self.state, self.batch)
        return metrics


def functional_runner(cfg: fm.ModelConfig, params: Any, batch: fm.Batch, v: Variant) -> FunctionalRunner:
    """A callable doing one functional step per call on ``batch`` (state kept inside)."""
    return FunctionalRunner(cfg, params, batch, v)


def reference_runner(cfg: fm.ModelConfig, params: Any, batch: fm.Batch, v: Variant) -> Callable[[], Any]:
    """A callable doing one step of the imperative recipe per call on ``batch``."""
    model = ReferenceGPT.from_params(params, cfg)
    if v.compile:
        model = torch.compile(model)
    trainer = ImperativeTrainer(model, lr=LR, weight_decay=WEIGHT_DECAY, precision=v.precision,
                                accum_steps=v.accum, max_grad_norm=MAX_GRAD_NORM)
    return lambda: trainer.step(batch.tokens, batch.targets)


def make_runner(cfg: fm.ModelConfig, params: Any, batch: fm.Batch, v: Variant) -> Callable[[], Any]:
    """The runner for variant ``v``."""
    return (reference_runner if v.kind == "ref" else functional_runner)(cfg, params, batch, v)


def describe(v: Variant) -> dict:
    """The variant's fields as a JSON-ready dict."""
    d = dataclasses.asdict(v)
    d["remat"] = None if v.remat is None else str(v.remat)
    return d
