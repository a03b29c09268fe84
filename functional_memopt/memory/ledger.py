"""The memory ledger: predicted bytes of one training step, item by item, and its peak.

Every activation term is counted from what the model's pure functions save for the backward pass
(``torch.autograd.graph.saved_tensors_hooks`` on ``apply``; tests/test_ledger.py holds the count
exact). Per block, with N = micro-batch tokens, C = width, H = mlp width, h = heads, in bytes of the
compute dtype ``cs`` (layer-norm statistics in ``sb``: the compute dtype on the CPU, float32 on CUDA)::

    x, ln_1 out, qkv (3C), attention out, x + attn, ln_2 out, c_fc out (H), gelu out (H), and
    the mean and rstd of both layer norms
    = N * ((8C + 2H) * cs + 4 * sb + 4h)        # 4h: SDPA's float32 log-sum-exp per head

A rematerialised block keeps only its input (N * C * cs); its activations come back, one block at a
time, while its backward runs. The cross-entropy peaks in its backward, where the saved float32
log-softmax, the dense NLL gradient and the log-softmax gradient are alive together: 12 bytes per
logit, more than the forward's compute-dtype logits plus their float32 copy and log-softmax.

The step does not hold every item at once, so the total is a peak over moments, not a sum: the
start of the backward (all activations, the logits' buffers, no gradients yet), each block's
backward (fewer activations, more finished gradients), and the optimizer update (gradients, AdamW's
new moments and temporaries, no activations). This models ``make_train_step`` with the default
``engine="autograd"``. ``engine="func"`` differentiates with ``create_graph=True`` (inside
``torch.func.grad_and_value``), which keeps every saved tensor until the backward ends: 1.7x the
autograd peak on a small model, not modelled here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..data.batch import rows_per_microbatch
from ..model.attention import attention_kernel
from ..model.cce_loss import CCE, CCE_DTYPES, cce_loss_bytes
from ..model.chunked_loss import chunked_loss_bytes, liger_chunk
from ..model.config import ModelConfig
from ..model.layout import param_shapes
from ..model.remat import remat_layers
from ..train.precision import get_policy

__all__ = ["MemorySettings", "MemoryPrediction", "predict_memory", "ablation", "choose_loss_chunk", "ITEMS",
           "block_saved_bytes", "saved_activation_bytes"]

# Tokens: each chunk's head-gradient product reads and writes the whole (V, C) sum once, so thin
# chunks cost more than the logits they save (GPT-2, 2 x 128 tokens, fp32, one thread: chunk 32
# 1.03x the whole-logits step, 64 1.01x, 128 0.94x; benchmarks/chunked_loss_bench.py).
MIN_LOSS_CHUNK = 128
ITEMS = ("params", "compute_params", "gradients", "optimizer", "accumulator", "activations", "logits",
         "update", "batch")


class MemorySettings(NamedTuple):
    """The techniques a prediction (or a measurement) is made for."""

    policy: str = "fp32"  # precision policy name (see get_policy)
    accum_steps: int = 1  # micro-batches per step; must divide the batch size
    remat: Any = None  # blocks rematerialised: None, "all", every n-th as an int, or indices
    tied: bool = True  # one leaf for embedding and head; False adds a separate (V, C) lm_head
    zero_stage: int = 0  # 0, 1 (optimizer state sharded) or 2 (and gradients)
    world_size: int = 1  # ranks the ZeRO shards are spread over
    donate: bool = False  # make_train_step(donate=True): the optimizer updates in place
    loss_chunk: int | str | None = None  # make_train_step(loss_chunk=...): tokens per chunk, or "cce"


class MemoryPrediction(NamedTuple):
    """Predicted bytes of one step; every item an int, ``total`` the predicted peak."""

    params: int  # master params at param dtype (with the lm_head when untied)
    compute_params: int  # the compute-dtype copy a mixed policy casts (0 when the dtypes agree)
    gradients: int  # the gradient tree at accumulator dtype (/N under ZeRO stage 2)
    optimizer: int  # AdamW's two moments at param dtype (/N under ZeRO stage >= 1)
    accumulator: int  # float32 gradient sum held while later micro-batches run (0 when k = 1)
    activations: int  # saved for backward by one micro-batch (remat: plus one block's recompute)
    logits: int  # the cross-entropy at its peak: 12 bytes a logit whole, or the chunked loss's bytes
    update: int  # optimizer temporaries: out of place, a stepped copy of params and moments (/N, ZeRO >= 1)
    batch: int  # tokens, targets and loss mask of the whole batch
    total: int  # the predicted peak: the largest of the moments in ``peak``
    phase: str  # which moment holds the peak: "loss", "block i" or "update"
    peak: dict  # {item: bytes} alive at that moment; sums to ``total``
    moments: dict  # {moment: bytes} predicted at every moment considered
    settings: MemorySettings  # what was predicted
    floor: int  # params, optimizer moments and one float32 gradient: what no technique here removes

    def breakdown(self) -> dict:
        """``{item: bytes}`` for every item in ITEMS (sizes, not all alive at the same moment)."""
        return {name: getattr(self, name) for name in ITEMS}


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _attention_bytes(cfg: ModelConfig, seq_len: int, compute_bytes: int, kernel: str) -> int:
    """Per token, what the attention kernel saves besides q, k, v and its output: SDPA's float32
    log-sum-exp per head, or the math kernel's (h, T) probabilities in the compute dtype."""
    return cfg.n_head * seq_len * compute_bytes if kernel == "math" else 4 * cfg.n_head


def block_saved_bytes(cfg: ModelConfig, tokens: int, *, compute_bytes: int, stat_bytes: int, seq_len: int = 0,
                      kernel: str = "sdpa") -> int:
    """Bytes one transformer block saves for backward for ``tokens`` = B * T tokens.

    ``kernel`` is the attention kernel that runs ("sdpa" or "math", see ``model/attention.py``);
    the math kernel's saved probabilities grow with ``seq_len`` (T).

    Example:
        >>> block_saved_bytes(ModelConfig(n_embd=32, n_head=4), 10, compute_bytes=4, stat_bytes=4)
        20800
    """
    if kernel not in ("sdpa", "math") or (kernel == "math" and seq_len < 1):
        raise ValueError(f"block_saved_bytes: kernel must be 'sdpa' or 'math' (with seq_len >= 1, the T its saved "
                         f"probabilities grow with), got kernel={kernel!r}, seq_len={seq_len!r}.")
    C, H = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    attention = _attention_bytes(cfg, seq_len, compute_bytes, kernel)
    return tokens * ((8 * C + 2 * H) * compute_bytes + 4 * stat_bytes + attention)


class _Saved(NamedTuple):
    kept: list  # bytes each block keeps through the forward (its input alone under remat)
    full: int  # bytes one block saves without remat
    head: int  # final layer norm's input, statistics and output
    loss: int  # per-token loss weights, position ids, the NLL's total weight
    log_softmax: int  # the cross-entropy's saved float32 log-probabilities


def _saved(cfg, batch_size, seq_len, *, cb: int, sb: int, chosen, kernel: str) -> _Saved:
    N, C = batch_size * seq_len, cfg.n_embd
    full = block_saved_bytes(cfg, N, compute_bytes=cb, stat_bytes=sb, seq_len=seq_len, kernel=kernel)
    kept = [N * C * cb if i in chosen else full for i in range(cfg.n_layer)]
    return _Saved(kept, full, N * (2 * C * cb + 2 * sb), N * 4 + seq_len * 8 + 4, N * cfg.vocab_size * max(cb, 4))


def saved_activation_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, *,
                           compute_dtype: torch.dtype = torch.float32, remat: Any = None, device: str = "cpu") -> int:
    """Bytes the forward of ``loss_fn`` saves for backward, beyond the params and the batch.

    The sum of what every block keeps, the final norm, the loss's per-token vectors and the
    float32 log-softmax; the count that tests/test_ledger.py checks against saved-tensor hooks.

    Example:
        >>> saved_activation_bytes(ModelConfig(n_layer=2), 4, 32) > 0
        True
    """
    sb = 4 if device == "cuda" else _dtype_bytes(compute_dtype)
    kernel = attention_kernel(cfg.attention, seq_len, cfg.head_dim, compute_dtype, device)
    sv = _saved(cfg, batch_size, seq_len, cb=_dtype_bytes(compute_dtype), sb=sb,
                chosen=remat_layers(remat, cfg.n_layer), kernel=kernel)
    return sum(sv.kept) + sv.head + sv.loss + sv.log_softmax


def _check(cfg, batch_size, seq_len, s: MemorySettings, device) -> None:
    fn = "predict_memory"
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{fn}: cfg must be a ModelConfig, got {type(cfg).__name__}; use get_config('tiny').")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("accum_steps", s.accum_steps),
                        ("world_size", s.world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r}.")
    if seq_len > cfg.block_size:
        raise ValueError(f"{fn}: seq_len {seq_len} is longer than block_size {cfg.block_size}; "
                         "shorten the sequence or raise block_size.")
    rows_per_microbatch(batch_size, s.accum_steps, caller=fn)
    if s.loss_chunk == CCE:
        if device != "cuda" or get_policy(s.policy).compute_dtype not in CCE_DTYPES:
            raise ValueError(f"{fn}: loss_chunk='cce' (cut-cross-entropy's kernels) runs on CUDA with a half compute "
                             f"dtype; pass device='cuda' and a mixed policy, or an integer loss_chunk.")
    elif s.loss_chunk is not None:
        if isinstance(s.loss_chunk, bool) or not isinstance(s.loss_chunk, int) or s.loss_chunk < 1:
            raise ValueError(f"{fn}: loss_chunk must be None, an integer >= 1 or 'cce', got {s.loss_chunk!r}.")
        if not s.tied:
            raise ValueError(f"{fn}: loss_chunk chunks the tied head; the untied variant has no chunked loss.")
    if s.zero_stage not in (0, 1, 2):
        raise ValueError(f"{fn}: zero_stage must be 0, 1 or 2, got {s.zero_stage!r}.")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: device must be 'cpu' or 'cuda', got {device!r}.")


def predict_memory(cfg: ModelConfig, *, batch_size: int, seq_len: int, device: str = "cpu",
                   **settings) -> MemoryPrediction:
    """Predict the bytes of one ``make_train_step`` step with AdamW, item by item.

    Args:
        cfg: the model shape.
        batch_size: rows per step (B); split into ``accum_steps`` micro-batches.
        seq_len: tokens per row (T <= block_size).
        device: "cpu" or "cuda" (CUDA's layer norm keeps its statistics in float32).
        **settings: the fields of :class:`MemorySettings` (policy, accum_steps, remat, tied,
            zero_stage, world_size, donate, loss_chunk).

    Returns:
        A :class:`MemoryPrediction`.

    Example:
        >>> p = predict_memory(ModelConfig(), batch_size=8, seq_len=128, policy="mixed_bf16")
        >>> p.total > p.params
        True
    """
    unknown = sorted(set(settings) - set(MemorySettings._fields))
    if unknown:
        raise TypeError(f"predict_memory: unknown settings {unknown}; expected some of {MemorySettings._fields}.")
    s = MemorySettings(**settings)
    _check(cfg, batch_size, seq_len, s, device)
    pol = get_policy(s.policy)  # raises ValueError naming the accepted forms
    chosen = remat_layers(s.remat, cfg.n_layer)
    pb, cb = _dtype_bytes(pol.param_dtype), _dtype_bytes(pol.compute_dtype)
    gb = max(pb, 4)  # the fold hands the optimizer float32 (or wider) gradients
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    H = cfg.mlp_ratio * C

    shapes = param_shapes(cfg)
    n_blk = sum(math.prod(v) for k, v in shapes.items() if k.startswith("h.0."))
    n_head = math.prod(shapes["wte"]) + sum(math.prod(v) for k, v in shapes.items() if k.startswith("ln_f"))
    n_head += 0 if s.tied else V * C
    n_params = sum(math.prod(v) for v in shapes.values()) + (0 if s.tied else V * C)
    n_mlp_out = math.prod(shapes["h.0.mlp.c_proj.weight"]) + (C if cfg.bias else 0)
    n_ln = 2 * C if cfg.bias else C
    shard = lambda n: -(-n // s.world_size)  # noqa: E731  ceil: ZeRO pads the flat vector to N slices

    params = n_params * pb
    cast = pol.compute_dtype != pol.param_dtype
    compute = n_params * cb if cast else 0
    cc_blk = n_blk * cb if cast else 0
    grads = (shard(n_params) if s.zero_stage == 2 else n_params) * gb
    optimizer = 2 * (shard(n_params) if s.zero_stage >= 1 else n_params) * pb
    accumulator = n_params * 4 if s.accum_steps > 1 else 0
    n_upd = shard(n_params) if s.zero_stage >= 1 else n_params
    # AdamW's fused kernel steps the params itself (``update_and_apply``). Out of place it steps a
    # copy of them and of mu and nu: three new trees; donated, it writes into params and moments,
    # so nothing new (tests/test_ledger.py measures both where the update decides the peak). Under
    # ZeRO with more than one rank, the params' all-gather after the update is not counted.
    update = 0 if s.donate else n_upd * pb * 3
    batch = batch_size * seq_len * (8 + 8 + 4)

    b = batch_size // s.accum_steps
    N = b * seq_len
    kernel = attention_kernel(cfg.attention, seq_len, cfg.head_dim, pol.compute_dtype, device)
    sv = _saved(cfg, b, seq_len, cb=cb, sb=4 if device == "cuda" else cb, chosen=chosen, kernel=kernel)
    # A block's backward peaks at its MLP (the gelu gradients) or at its attention (the q, k, v
    # gradients, most of the block's weight gradients done). Under remat the recompute's vjp also
    # holds every recomputed tensor and the block's output until the block is finished.
    attn_saved = N * (6 * C * cb + 2 * (4 if device == "cuda" else cb) + _attention_bytes(cfg, seq_len, cb, kernel))
    points = {  # remat? -> [(activation bytes, the block's own finished gradient elements)]
        True: [(sv.full + (2 * N * H + 2 * N * C) * cb, n_mlp_out), (sv.full + 7 * N * C * cb, n_blk - n_ln)],
        False: [(sv.full + (N * H + N * C) * cb, n_mlp_out), (attn_saved + 6 * N * C * cb, n_blk - n_ln)],
    }
    if kernel == "math":
        # Its softmax backward: beside the saved probabilities, their gradient and the scores'
        # ((B, h, T, T) each); q, k and c_attn have no gradient yet. Measured (tests/test_ledger.py):
        # without remat the attention output's gradient and v's stand where its copy was; under
        # remat the vjp adds the block's output, its incoming gradient and those two, (N, C) each.
        scores = 2 * N * cfg.n_head * seq_len * cb
        n_qkv = math.prod(shapes["h.0.attn.c_attn.weight"]) + (3 * C if cfg.bias else 0)
        points[True].append((sv.full + scores + 4 * N * C * cb, n_blk - n_ln - n_qkv))
        points[False].append((attn_saved + scores, n_blk - n_ln - n_qkv))
    # The step's chunked head adds its gradient straight into the float32 (or wider) sum of wte in
    # the forward (a HeadGradSink), and the embeddings read the master tables.
    direct = isinstance(s.loss_chunk, int) and s.tied and pb >= 4
    n_wte, n_wpe = math.prod(shapes["wte"]), math.prod(shapes["wpe"])
    # Without an accumulator to hold it (k = 1), the sink is wte's gradient, made as zeros first.
    sink = n_wte * 4 if direct and s.accum_steps == 1 else 0
    if s.loss_chunk is None:
        logits = 3 * sv.log_softmax  # saved log-softmax, NLL gradient, log-softmax gradient
        forward = sum(sv.kept) + sv.head + sv.loss
    else:  # gradients made chunk by chunk in the forward: no log-softmax saved, no (N, V) buffer
        logits = (cce_loss_bytes(N, V, C, compute_bytes=cb) if s.loss_chunk == CCE else
                  chunked_loss_bytes(N, s.loss_chunk, V, C, compute_bytes=cb, direct=direct))["peak"]
        forward = sum(sv.kept) + sv.head + seq_len * 8
    recompute = max((a - N * C * cb for i in chosen for a, _ in points[True]), default=0)

    static = {"params": params, "optimizer": optimizer, "batch": batch}
    if s.tied:
        # The model's own loss casts each block's params just in time: a block's copy is saved by
        # its linears until its backward, unless the block is rematerialised (then the copy exists
        # only inside its forward and its recompute). The copies of wte and ln_f serve the head.
        kept_copies = [0 if i in chosen else cc_blk for i in range(L)]
        at_loss = n_head * cb * cast + sum(kept_copies)
    else:
        # The untied variant is a custom loss: the policy casts the whole tree before it runs.
        kept_copies = [cc_blk] * L
        at_loss = compute - (math.prod(shapes["wpe"]) * cb if cast else 0)
    # The wpe copy is only read by an embedding, which saves indices, so it is gone by the loss.
    moments = {"loss": {**static, "compute_params": at_loss, "accumulator": accumulator, "activations": forward,
                        "logits": logits, "gradients": sink}}

    def done_grads(j: int, own: int) -> int:
        """Gradient bytes at block j's backward: the head's and the blocks' above, and its own so far."""
        if direct:  # the head's part is in the sink; the rest as below
            above = 0 if s.accum_steps > 1 else (n_head - n_wte + (L - 1 - j) * n_blk) * pb
            return sink + above + own * cb
        if s.tied:
            # Just-in-time casts are recorded after the embedding, so autograd runs each one as soon
            # as its block (or ln_f) is done: those gradients are already back in the param dtype,
            # and autograd adds them into the accumulator at once (the in-place fold), which from
            # the second micro-batch on already holds every leaf. wte's cast was recorded first
            # (its copy serves embedding and head): its gradient waits, in the compute dtype.
            above = 0 if s.accum_steps > 1 else (n_head - n_wte + (L - 1 - j) * n_blk) * pb
            return n_wte * cb + above + own * cb
        return (n_head + (L - 1 - j) * n_blk + own) * cb

    # Block j's backward: blocks below still hold their saved tensors; the head and the blocks
    # above are done, so their compute copies are gone and their gradients exist, in the compute
    # dtype: the casts back to the param dtype were recorded first, so autograd runs them last.
    for j in range(L - 1, -1, -1):
        for a, own in points[j in chosen]:
            moment = {**static, "compute_params": sum(kept_copies[:j]) + cc_blk, "accumulator": accumulator,
                      "activations": sum(sv.kept[:j]) + a + seq_len * 8,
                      "gradients": done_grads(j, own)}
            if sum(moment.values()) > sum(moments.get(f"block {j}", {}).values()):
                moments[f"block {j}"] = moment
    # The embeddings' backward, last: every other gradient is done (k = 1) or in the accumulator.
    # Their (N, C) gradient, and a dense table of wte's gradient: read from the masters (direct),
    # a float32 table added into the sum in place; else a compute-dtype table, summed with the
    # head's (waiting since the loss), and its float32 cast.
    if s.tied:
        rest = 0 if s.accum_steps > 1 else (n_params - n_wte - n_wpe) * pb
        back = 4 if cast else 0  # the cast of a compute-dtype table back to float32
        table = (n_wte + n_wpe) * 4 if direct else n_wte * (2 * cb + back) + n_wpe * (cb + back)
        moments["embedding"] = {**static, "accumulator": accumulator, "gradients": rest + sink + table,
                                "activations": N * C * (cb + 4) + seq_len * 8}
    # A half-precision param dtype adds the gradients cast back from the float32 fold.
    moments["update"] = {**static, "gradients": grads + (n_params * pb if pb < 4 else 0), "update": update}
    phase = max(moments, key=lambda k: sum(moments[k].values()))
    peak = {k: v for k, v in moments[phase].items() if v}
    floor = params + optimizer + (shard(n_params) if s.zero_stage == 2 else n_params) * 4
    return MemoryPrediction(params, compute, grads, optimizer, accumulator, forward + recompute, logits, update,
                            batch, sum(peak.values()), phase, peak,
                            {k: sum(v.values()) for k, v in moments.items()}, s, floor)


def choose_loss_chunk(cfg: ModelConfig, micro_batch_tokens: int) -> int:
    """The chunk the ledger picks for the chunked loss: Liger Kernel's, whose logits are about as big as x.

    A chunk of c tokens holds c x V logits while x holds N x C values, so with
    ``c ~ N / ceil(V / C)`` the loss's working set is about that of one activation: it never
    decides the peak (32 tokens at GPT-2's shape, 2 x 1024 tokens). Never fewer than
    ``MIN_LOSS_CHUNK`` = 128 tokens (or all of them): each chunk adds its part of the head's
    gradient into the whole (V, C) sum, a pass over V x C that thin chunks make too often.

    Example:
        >>> choose_loss_chunk(ModelConfig(vocab_size=50257, n_embd=768, n_head=12), 2048)
        128
    """
    return max(liger_chunk(micro_batch_tokens, cfg.vocab_size, cfg.n_embd), min(MIN_LOSS_CHUNK, micro_batch_tokens))


def ablation(cfg: ModelConfig, batch_size: int, seq_len: int, *, policy: str = "mixed_bf16",
             accum_steps: int = 4, remat: Any = "all", loss_chunk: int | str | None = "auto", donate: bool = True,
             zero_stage: int = 0, world_size: int = 1, device: str = "cpu") -> list[tuple[str, MemoryPrediction]]:
    """Predictions for the baseline, each technique added alone, and all together.

    The baseline is fp32, one micro-batch, no remat, an untied head, out-of-place updates (the
    library always ties; the ledger and the measurement model the untied head as a separate
    ``lm_head`` leaf). The chunked loss chunks the tied head, so its row is tied too. "all" is
    what ``memopt train`` runs with the same flags (donated updates, the chunked loss).

    Args:
        cfg, batch_size, seq_len, device: as for :func:`predict_memory`.
        policy: the mixed policy of the precision row.
        accum_steps: k of the accumulation row (1 leaves the row out).
        remat: remat spec of the remat row (None leaves the row out).
        loss_chunk: tokens per chunk of the chunked-loss row, "auto" for :func:`choose_loss_chunk`
            (None leaves the row out).
        donate: a row of in-place (donated) optimizer updates.
        zero_stage, world_size: a ZeRO row when both are past their defaults.

    Returns:
        ``[(name, prediction), ...]``, the baseline first and "all" last; each prediction's
        ``floor`` is the bytes of params, moments and one float32 gradient.

    Example:
        >>> rows = ablation(ModelConfig(), 8, 128)
        >>> [name for name, _ in rows][0], rows[-1][1].total < rows[0][1].total
        ('baseline', True)
    """
    for name, value, low in (("accum_steps", accum_steps, 1), ("world_size", world_size, 1),
                             ("zero_stage", zero_stage, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"ablation: {name} must be an integer >= {low}, got {value!r}.")
    if loss_chunk == "auto":
        loss_chunk = choose_loss_chunk(cfg, batch_size // accum_steps * seq_len)
    base = MemorySettings(policy="fp32", tied=False)
    alone = [(f"{policy}", {"policy": policy})]
    if accum_steps > 1:
        alone.append((f"accum {accum_steps}", {"accum_steps": accum_steps}))
    if remat not in (None, "none", False):
        alone.append((f"remat {remat}", {"remat": remat}))
    alone.append(("tied", {"tied": True}))
    if loss_chunk is not None:
        alone.append((f"chunked loss {loss_chunk}", {"tied": True, "loss_chunk": loss_chunk}))
    if donate:
        alone.append(("donated", {"donate": True}))
    if zero_stage > 0 and world_size > 1:
        alone.append((f"zero{zero_stage} x{world_size}", {"zero_stage": zero_stage, "world_size": world_size}))
    rows = [("baseline", base)] + [(name, base._replace(**change)) for name, change in alone]
    everything = base._replace(**{k: v for _, change in alone for k, v in change.items()})
    rows.append(("all", everything))
    return [(name, predict_memory(cfg, batch_size=batch_size, seq_len=seq_len, device=device, **s._asdict()))
            for name, s in rows]
