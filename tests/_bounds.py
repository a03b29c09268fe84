"""Error bounds on two training trajectories whose gradients agree to a known relative error.

Two runs of SGD with momentum (``buf = momentum * buf + g``, ``p -= lr * buf``) whose gradients
differ by at most ``rho * ||g||`` (relative L2) at every step end up with params that differ by at
most ``lr * sum_t ||buf error_t||``, with ``buf error_t = momentum * buf error_(t-1) + rho * ||g_t||``,
by the triangle inequality. Each run also rounds its params to float32 once a step (half an ulp
each, so one ulp between them: ``eps32 * ||p||``). The gradient at step t is taken at params that
already differ, which adds ``lr * |Hessian|`` times the bound again; over the few steps and small
rates of the tests that is below the bound itself, so the bound is doubled for it.

AdamW's first moment ``mu = b1 * mu + (1 - b1) * g`` is linear in the gradient history in the same
way, with one float32 rounding of mu a step.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps


class MomentumBound:
    """``step(rho, g_norm, p_norm)`` after each applied step returns the bound on ``||p_a - p_b||``."""

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.buf = self.params = 0.0

    def step(self, rho: float, g_norm: float, p_norm: float) -> float:
        self.buf = self.momentum * self.buf + rho * g_norm
        self.params += self.lr * self.buf + EPS32 * p_norm
        return 2 * self.params


class FirstMomentBound:
    """``step(rho, g_norm, mu_norm)`` after each applied step returns the bound on ``||mu_a - mu_b||``."""

    def __init__(self, b1: float):
        self.b1 = b1
        self.mu = 0.0

    def step(self, rho: float, g_norm: float, mu_norm: float) -> float:
        self.mu = self.b1 * self.mu + (1 - self.b1) * rho * g_norm + EPS32 * mu_norm
        return 2 * self.mu


def l2(tree) -> float:
    """The L2 norm of all leaves of a tree, in float64."""
    import optree

    return float(sum(x.double().square().sum() for x in optree.tree_leaves(tree)) ** 0.5)


def l2_difference(a, b) -> float:
    """``||a - b||`` over all leaves of two trees of one structure, in float64."""
    import optree

    return float(sum((x.double() - y.double()).square().sum()
                     for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b))) ** 0.5)
