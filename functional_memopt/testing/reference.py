"""The imperative reference: an nn.Module GPT and the standard PyTorch training recipe.

This is what the functional step is measured and tested against: a nanoGPT-style module holding
the same weights, trained with ``torch.autocast``, ``torch.amp.GradScaler``, the summed token loss
over the step's token count, ``unscale_``, ``clip_grad_norm_`` and ``torch.optim.AdamW(foreach=True)``
(or ``torch.optim.SGD``). It shares no code with the functional step: only the parameter layout, to
copy weights in and out.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.config import ModelConfig
from .._tree import tree_flatten_with_paths, tree_unflatten_from_paths
from ..model.layout import init_params

__all__ = ["ReferenceGPT", "ImperativeTrainer"]


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = _Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = _MLP(cfg)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    """A nanoGPT-style module whose parameter names are the functional params' key paths.

    Example:
        >>> import functional_memopt as fm
        >>> cfg = fm.ModelConfig(n_layer=1, n_head=2, n_embd=16)
        >>> model = ReferenceGPT.from_params(fm.init_params(cfg), cfg)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)

    @classmethod
    def from_params(cls, params: dict, cfg: ModelConfig) -> "ReferenceGPT":
        """A module holding copies of ``params`` (same dtype and device)."""
        flat = tree_flatten_with_paths(params)
        leaf = flat["wte"]
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=leaf.device).to(leaf.dtype)
        state = {(k + ".weight" if k in ("wte", "wpe") else k): v.detach().clone() for k, v in flat.items()}
        model.load_state_dict(state, strict=True)
        return model

    def params(self) -> dict:
        """The module's weights as a functional params tree (detached copies)."""
        return self.tree(dict(self.named_parameters()))

    def tree(self, named: dict) -> dict:
        """A params-shaped tree from a ``{parameter name: tensor}`` dict (detached copies).

        E.g. the optimizer's moments: ``model.tree({n: opt.state[p]["exp_avg"] for n, p in
        model.named_parameters()})``.
        """
        tree = init_params(self.cfg, device="meta")
        out = {}
        for path in tree_flatten_with_paths(tree):
            key = path + ".weight" if path in ("wte", "wpe") else path
            out[path] = named[key].detach().clone()
        return tree_unflatten_from_paths(out, tree)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits; the head is tied to ``wte`` (F.linear on its weight)."""
        B, T = tokens.shape
        mask = None
        if attention_mask is not None:
            idx = torch.arange(T, device=tokens.device)
            mask = (idx[:, None] >= idx[None, :]) & attention_mask.bool()[:, None, None, :]
            mask = mask | (idx[:, None] == idx[None, :])
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for block in self.h:
            x = block(x, mask)
        return F.linear(self.ln_f(x), self.wte.weight)


class ImperativeTrainer:
    """The standard recipe, one optimizer step per call on a batch split into micro-batches.

    Written the way a PyTorch user writes it, with no code from the functional step. Per
    micro-batch: autocast forward, summed token cross-entropy divided by the step's total count of
    target tokens (``num_items_in_batch``, as transformers normalises since October 2024), and
    ``scaler.scale(loss).backward()``; then ``scaler.unscale_``, ``clip_grad_norm_``,
    ``scaler.step``, ``scaler.update``, ``zero_grad(set_to_none=True)``. A loss mask is applied the
    Hugging Face way: a target whose mask is 0 becomes the ignored label -100.

    Args:
        model: the module to train (float32 weights).
        optimizer: "adamw" (``torch.optim.AdamW(foreach=True)``) or "sgd" (``torch.optim.SGD(foreach=True)``).
        lr, betas, eps, weight_decay: the optimizer's arguments (SGD takes lr, momentum and weight_decay).
        momentum: SGD's momentum.
        precision: "fp32", "bf16" or "fp16" (fp16 adds a GradScaler).
        accum_steps: micro-batches per step (rows split by ``tensor_split``, sizes differ by at most one).
        max_grad_norm: clip norm, or None.
        init_scale, growth_interval: GradScaler arguments for fp16 (its other defaults are kept).
    """

    def __init__(self, model: nn.Module, *, optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01, momentum=0.0, precision="fp32", accum_steps=1, max_grad_norm=None,
                 init_scale=2.0**16, growth_interval=2000):
        self.model = model
        if optimizer == "adamw":
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps,
                                         weight_decay=weight_decay, foreach=True)
        elif optimizer == "sgd":
            self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                       foreach=True)
        else:
            raise ValueError(f"ImperativeTrainer: optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        device = next(model.parameters()).device.type
        self.device_type = device
        self.scaler = torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=growth_interval,
                                           enabled=precision == "fp16")
        self.accum_steps = accum_steps
        self.max_grad_norm = max_grad_norm

    def optimizer_state(self, key: str) -> dict:
        """One per-parameter optimizer state as a params tree, e.g. "exp_avg" (AdamW's first moment)."""
        return self.model.tree({n: self.opt.state[p][key] for n, p in self.model.named_parameters()})

    @staticmethod
    def labels(targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``targets`` with -100 wherever ``mask`` is 0 (the mask must hold only 0 and 1)."""
        if mask is None:
            return targets
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("ImperativeTrainer: the loss mask must hold only 0 and 1.")
        return torch.where(mask.bool(), targets, torch.full_like(targets, -100))

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None) -> dict:
        """One optimizer step; returns loss, grad_norm, the scale used, whether it was skipped, and tokens.

        Args:
            tokens, targets: (B, T) int64; targets equal to -100 are not counted.
            mask: optional (B, T) 0/1 loss mask.
            attention_mask: optional (B, T) padding mask (1 = real key).
        """
        labels = self.labels(targets, mask)
        n_items = (labels != -100).sum()  # the step's token count, known before the first backward
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        total = 0.0
        k = self.accum_steps
        pads = attention_mask.tensor_split(k) if attention_mask is not None else [None] * k
        for x, y, am in zip(tokens.tensor_split(k), labels.tensor_split(k), pads):
            with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                logits = self.model(x, attention_mask=am)
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)
            loss = loss_sum / n_items.clamp(min=1)
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
        self.scaler.step(self.opt)
        self.scaler.update()
        new_scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.opt.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": float(norm), "loss_scale": scale,
                "skipped": bool(self.scaler.is_enabled() and new_scale < scale), "tokens": int(n_items)}
