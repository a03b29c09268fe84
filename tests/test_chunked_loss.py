"""The chunked loss equals the plain loss and its gradients, and never holds the whole logits.

The plain path is ``token_loss(F.linear(x, w), targets, mask)``, the model's own loss.
"""
from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import functional_memopt as fm
import functional_memopt.testing  # noqa: F401  (fm.testing below)
from functional_memopt.data.batch import IGNORE_INDEX
from functional_memopt.model.chunked_loss import HeadGradSink, chunked_loss_bytes, chunked_token_loss, liger_chunk, sink_rows
from functional_memopt.model.gpt import token_loss


def plain(x, w, t, m):
    return token_loss(F.linear(x, w), t, m)


def make_case(seed, B, T, C, V, dtype, p_ignore=0.2, p_mask=0.3, pad=True, scale=1.0,
              use_mask=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(V, C, generator=g, dtype=torch.float64) / math.sqrt(C)).to(dtype)
    t = torch.randint(0, V, (B, T), generator=g)
    t[torch.rand(B, T, generator=g) < p_ignore] = IGNORE_INDEX
    if pad:  # padding rows: a random tail of each sequence (possibly all of it) is ignored
        for b in range(B):
            n_pad = int(torch.randint(0, T + 1, (1,), generator=g))
            if n_pad:
                t[b, T - n_pad:] = IGNORE_INDEX
    m = (torch.rand(B, T, generator=g) >= p_mask).to(dtype) if use_mask else None
    return x, w, t, m


def loss_and_grads(fn, x, w, t, m, **kw):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    loss, count = fn(x, w, t, m, **kw)
    gx, gw = torch.autograd.grad(loss, [x, w])
    return loss.detach(), count, gx, gw


# ------------------------------------------------------------------- float32 error bounds
def float32_bounds(x, w, t, m):
    """Bounds on |chunked_f32 - plain_f32| for loss_sum, grad_x, grad_weight (g_loss = 1).

    Standard floating-point error analysis, u = 2^-24 (float32 unit roundoff),
    gamma(n) = n u / (1 - n u) bounds the error of any n-term summation order:
      * logits: both paths run a float32 GEMM of length C (row blocks may be summed in another
        order by BLAS), each within gamma(C) * A_ij with A = |x| |W|^T, so they differ by at
        most d_i = 2 gamma(C) max_j A_ij on row i;
      * log-softmax: max-subtract, exp, a V-term sum and a log; each path errs by at most
        gamma(V + 4) (2 max_j |z_ij| + log V + 1) on nll_i / lse_i, so the two differ by
        e_i = 2 gamma(V + 4) (...) plus the logit perturbation 2 d_i (lse is 1-Lipschitz);
      * loss_sum = sum_i w_i nll_i: N-term sums (chunked: c-term partials, then N/c of those:
        still <= N + 1 terms deep) -> 2 gamma(N + 2) sum_i w_i |nll_i| for the two paths;
      * grad_logits G_ij = w_i (p_ij - [j = t_i]): p = exp(z - lse) moves by at most
        p_ij (exp(eps_i) - 1) with eps_i = 2 d_i + e_i + 4u, and each path rounds G with ~2u;
      * grad_x = G W (V-term sums): |dG| |W| + 2 gamma(V) |G| |W|;
        grad_W = G^T x (N-term sums): |dG|^T |x| + 2 gamma(N + 1) |G|^T |x|.
    All bounds are first order; a factor 2 covers second-order terms and evaluating them
    with exact (float64) p, z, G instead of the computed ones.
    """
    u = 2.0 ** -24
    gam = lambda n: n * u / (1 - n * u)  # noqa: E731
    X = x.double().reshape(-1, x.shape[-1])
    W = w.double()
    N, C = X.shape
    V = W.shape[0]
    tf = t.reshape(-1)
    valid = tf != IGNORE_INDEX
    wt = valid.double() * (m.reshape(-1).double() if m is not None else 1.0)
    Z = X @ W.T
    A = X.abs() @ W.abs().T
    d = 2 * gam(C) * A.amax(1)
    zmax = Z.abs().amax(1)
    e = 2 * gam(V + 4) * (2 * zmax + math.log(V) + 1)
    lse = torch.logsumexp(Z, 1)
    ts = torch.where(valid, tf, 0)
    nll = torch.where(valid, lse - Z.gather(1, ts[:, None]).squeeze(1), 0.0)
    tol_loss = (wt * (2 * d + e)).sum() + 2 * gam(N + 2) * (wt * nll.abs()).sum()
    P = torch.softmax(Z, 1)
    onehot = torch.zeros_like(P).scatter_(1, ts[:, None], 1.0) * valid[:, None]
    G = wt[:, None] * (P - onehot)
    eps_i = 2 * d + e + 4 * u
    dG = wt[:, None] * P * torch.expm1(eps_i)[:, None] + 2 * u * G.abs()
    tol_gx = dG @ W.abs() + 2 * gam(V) * (G.abs() @ W.abs())
    tol_gw = dG.T @ X.abs() + 2 * gam(N + 1) * (G.abs().T @ X.abs())
    return 2 * tol_loss, 2 * tol_gx.reshape(x.shape), 2 * tol_gw


def assert_within(a, b, tol, what):
    diff = (a.double() - b.double()).abs()
    bad = diff > tol
    assert not bad.any(), (f"{what}: max |diff| {diff.max().item():.3e}, "
                           f"violations {int(bad.sum())}, min tol there {tol[bad].min().item():.3e}")


# ------------------------------------------------------------------------- property tests
case_params = dict(
    B=st.integers(1, 3), T=st.integers(1, 6), C=st.integers(1, 8), V=st.integers(2, 12),
    chunk_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
    p_ignore=st.sampled_from([0.0, 0.2, 0.6]), p_mask=st.sampled_from([0.0, 0.3, 1.0]),
    use_mask=st.booleans(), scale=st.sampled_from([0.1, 1.0, 5.0]),
    noncontig=st.booleans(),
)


def _draw(B, T, C, V, chunk_frac, seed, p_ignore, p_mask, use_mask, scale, noncontig, dtype):
    x, w, t, m = make_case(seed, B, T, C, V, dtype, p_ignore, p_mask, True, scale, use_mask)
    if noncontig:  # a non-contiguous x (reshape inside has to copy)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    N = B * T
    chunk = 1 + int(chunk_frac * (N + 2))  # uniform-ish in [1, N + 3]
    return x, w, t, m, chunk


@settings(max_examples=50, deadline=None)
@given(**case_params)
def test_matches_plain_float64(**kw):
    x, w, t, m, chunk = _draw(**kw, dtype=torch.float64)
    l1, c1, gx1, gw1 = loss_and_grads(chunked_token_loss, x, w, t, m, chunk=chunk)
    l0, c0, gx0, gw0 = loss_and_grads(plain, x, w, t, m)
    assert l1.dtype == c1.dtype == torch.float64 and l1.shape == c1.shape == ()
    assert not c1.requires_grad
    for a, b in ((l1, l0), (c1, c0), (gx1, gx0), (gw1, gw0)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@settings(max_examples=50, deadline=None)
@given(**case_params)
def test_matches_plain_float32(**kw):
    x, w, t, m, chunk = _draw(**kw, dtype=torch.float32)
    l1, c1, gx1, gw1 = loss_and_grads(chunked_token_loss, x, w, t, m, chunk=chunk)
    l0, c0, gx0, gw0 = loss_and_grads(plain, x, w, t, m)
    assert l1.dtype == c1.dtype == torch.float32 and l1.shape == c1.shape == ()
    assert c1.item() == c0.item()  # sums of 0/1 floats below 2^24 are exact
    tol_l, tol_gx, tol_gw = float32_bounds(x, w, t, m)
    assert_within(l1, l0, tol_l, "loss_sum")
    assert_within(gx1, gx0, tol_gx, "grad_x")
    assert_within(gw1, gw0, tol_gw, "grad_weight")


@settings(max_examples=25, deadline=None)
@given(**case_params)
def test_torch_func_grad_float64(**kw):
    x, w, t, m, chunk = _draw(**kw, dtype=torch.float64)

    def f_chunked(p):
        loss, count = chunked_token_loss(p["x"], p["w"], t, m, chunk=chunk)
        return loss, count

    def f_plain(p):
        return plain(p["x"], p["w"], t, m)

    g1, c1 = torch.func.grad(f_chunked, has_aux=True)({"x": x, "w": w})
    g0, c0 = torch.func.grad(f_plain, has_aux=True)({"x": x, "w": w})
    torch.testing.assert_close(c1, c0, rtol=0, atol=0)
    for k in ("x", "w"):
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-10)


def test_torch_func_grad_and_value_and_vjp():
    x, w, t, m = make_case(3, 2, 9, 6, 13, torch.float64)

    def f(fn, p):
        loss, count = fn(p["x"], p["w"], t, m)
        return loss / count.clamp_min(1), count

    ck = lambda *a: chunked_token_loss(*a, chunk=4)  # noqa: E731
    (g1, (v1, n1)) = torch.func.grad_and_value(lambda p: f(ck, p), has_aux=True)({"x": x, "w": w})
    (g0, (v0, n0)) = torch.func.grad_and_value(lambda p: f(plain, p), has_aux=True)({"x": x, "w": w})
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-12)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-10)
    cot = torch.tensor(1.7, dtype=torch.float64)
    o1, vjp1 = torch.func.vjp(lambda a, b: ck(a, b, t, m)[0], x, w)
    o0, vjp0 = torch.func.vjp(lambda a, b: plain(a, b, t, m)[0], x, w)
    torch.testing.assert_close(o1, o0, rtol=1e-12, atol=1e-12)
    for a, b in zip(vjp1(cot), vjp0(cot)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------ tied embedding
def _tied_model(loss_fn, W, A, tokens, targets, mask):
    emb = F.embedding(tokens, W)                 # W is the embedding table ...
    h = emb + torch.tanh(emb @ A)                # ... a small transform ...
    return loss_fn(h, W, targets, mask)          # ... and the head


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_tied_embedding_float64(chunk):
    B, T, C, V = 2, 11, 8, 17
    g = torch.Generator().manual_seed(chunk)
    W = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    A = (torch.randn(C, C, generator=g, dtype=torch.float64) / C).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -3:] = IGNORE_INDEX
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    ck = lambda *a: chunked_token_loss(*a, chunk=chunk)  # noqa: E731
    l1, _ = _tied_model(ck, W, A, tokens, targets, mask)
    l0, _ = _tied_model(plain, W, A, tokens, targets, mask)
    gW1, gA1 = torch.autograd.grad(l1, [W, A])
    gW0, gA0 = torch.autograd.grad(l0, [W, A])
    torch.testing.assert_close(gW1, gW0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gA1, gA0, rtol=1e-10, atol=1e-10)
    # the embedding path really contributes (so the check above covers the sum of both)
    emb_d = F.embedding(tokens, W.detach())
    head_only = torch.autograd.grad(ck(emb_d + torch.tanh(emb_d @ A), W, targets, mask)[0], W)[0]
    assert (gW1 - head_only).abs().max() > 1e-3
    # the same under torch.func.grad
    fg = lambda fn: torch.func.grad(  # noqa: E731
        lambda p: _tied_model(fn, p["W"], p["A"], tokens, targets, mask)[0])(
            {"W": W.detach(), "A": A.detach()})
    g1, g0 = fg(ck), fg(plain)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_x_is_a_view_of_weight(chunk):
    B, T, C, V = 2, 5, 4, 13
    g = torch.Generator().manual_seed(7)
    base = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()

    def f(fn, b):
        return fn(b[: B * T].view(B, T, C), b, targets, mask)[0]  # x is a view of weight

    ck = lambda *a: chunked_token_loss(*a, chunk=chunk)  # noqa: E731
    g1 = torch.autograd.grad(f(ck, base), base)[0]
    g0 = torch.autograd.grad(f(plain, base), base)[0]
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-10)
    g1f = torch.func.grad(lambda b: f(ck, b))(base.detach())
    torch.testing.assert_close(g1f, g0, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_bfloat16_close_to_plain_bfloat16(chunk):
    """Loss: both paths see bf16 logits z (each within u_bf = 2^-8 relative of the float32
    GEMM result, so two roundings differ by <= eps_bf = 2^-7 relative); nll moves by at most
    2 * that * max_j |z_ij|; the rest is float32 arithmetic. So
        |loss_c - loss_p| <= sum_i w_i * 2 eps_bf max_j |z_ij|   (+ float32 slack).
    Gradients: both are bf16 roundings of float32-accumulated GEMMs of bf16-rounded
    grad_logits. Sources of difference, as relative L2 error: the two final bf16 roundings
    (<= eps_bf), grad_logits landing on different sides of a bf16 rounding boundary after
    float32-level differences (<= eps_bf through the GEMM), and, for grad_weight only, the
    bf16 rounding of each chunk's (V, C) partial before the float32 accumulation (independent
    errors of <= u_bf |P_k| that add like a random walk, ~u_bf * ||sum_k P_k|| for
    uncorrelated partials). ~3 eps_bf expected; 8 eps_bf leaves margin. We check
    (a) ||chunked - plain|| / ||plain|| <= 8 eps_bf and (b) the chunked path is no further
    from the float64 evaluation of the same bf16 inputs than the plain bf16 path plus 8 eps_bf.
    """
    eps_bf = torch.finfo(torch.bfloat16).eps
    x, w, t, m = make_case(11, 2, 64, 32, 300, torch.bfloat16)
    l1, c1, gx1, gw1 = loss_and_grads(chunked_token_loss, x, w, t, m, chunk=chunk)
    l0, c0, gx0, gw0 = loss_and_grads(plain, x, w, t, m)
    assert l1.dtype == torch.float32 and gx1.dtype == gw1.dtype == torch.bfloat16
    assert c1.item() == c0.item()
    z = F.linear(x, w).double().reshape(-1, w.shape[0])
    wt = (t.reshape(-1) != IGNORE_INDEX).double() * m.reshape(-1).double()
    tol = (wt * 2 * eps_bf * z.abs().amax(1)).sum().item() + 1e-5 * abs(l0.item())
    assert abs(l1.item() - l0.item()) <= tol
    _, _, gx64, gw64 = loss_and_grads(plain, x.double(), w.double(), t, m)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    for name, g1, g0, g64 in (("grad_x", gx1, gx0, gx64), ("grad_weight", gw1, gw0, gw64)):
        assert rel(g1, g0) <= 8 * eps_bf, (name, rel(g1, g0))
        assert rel(g1, g64) <= rel(g0, g64) + 8 * eps_bf, (name, rel(g1, g64), rel(g0, g64))


# ------------------------------------------------------------------------------ memory
class LiveStorageTracker(TorchDispatchMode):
    """Running sum of the bytes of live tensor storages created under the mode (weakref on
    each untyped_storage: +nbytes when first seen, -nbytes when it is freed); `peak` is its
    maximum. Storages of `preexisting` tensors are known but not counted."""

    def __init__(self, preexisting=()):
        super().__init__()
        self.cur = self.peak = 0
        self.live = {}
        for tensor in preexisting:
            self._see(tensor.untyped_storage(), count=False)

    def _see(self, storage, count=True):
        key = id(storage)
        if key in self.live:
            return
        nbytes = storage.nbytes() if count else 0

        def freed(_ref, key=key, nbytes=nbytes):
            self.cur -= nbytes
            self.live.pop(key, None)

        self.live[key] = weakref.ref(storage, freed)
        self.cur += nbytes
        self.peak = max(self.peak, self.cur)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._see(item.untyped_storage())
        return out


def measure_peak(fn, N, V, C, dtype, via_func=False, **kw):
    """Peak live bytes above the inputs over forward + backward (plain autograd.grad, or
    torch.func.grad when via_func), with the two gradients kept alive at the end."""
    x, w, t, m = make_case(0, 2, N // 2, C, V, dtype, pad=False)
    if not via_func:
        x.requires_grad_(True)
        w.requires_grad_(True)
    with LiveStorageTracker([x, w, t, m]) as tracker:
        if via_func:
            grads = torch.func.grad(lambda a, b: fn(a, b, t, m, **kw)[0], argnums=(0, 1))(x, w)
        else:
            loss, _count = fn(x, w, t, m, **kw)
            grads = torch.autograd.grad(loss, [x, w])
            del loss, _count
    assert grads[0].shape == x.shape and grads[1].shape == w.shape
    return tracker.peak


@pytest.mark.parametrize("via_func", [False, True], ids=["autograd", "func"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_far_below_plain(dtype, via_func):
    N, V, C, chunk, h = 1024, 2000, 32, 64, dtype.itemsize
    peak = measure_peak(chunked_token_loss, N, V, C, dtype, via_func, chunk=chunk)
    plain_peak = measure_peak(plain, N, V, C, dtype, via_func)
    ledger = chunked_loss_bytes(N, chunk, V, C, compute_bytes=h)
    expected = ledger["peak"]
    assert peak < 0.5 * plain_peak, (peak, plain_peak)
    assert abs(peak - expected) <= 0.03 * expected, (peak, expected)


# ------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("chunk", [0, -3, 2.0, True, "8", None])
def test_bad_chunk(chunk):
    x, w, t, m = make_case(0, 1, 4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="^chunked_token_loss: chunk must be an int >= 1"):
        chunked_token_loss(x, w, t, m, chunk=chunk)


@pytest.mark.parametrize("bad", ["w_cols", "w_1d", "targets", "dtype"])
def test_bad_shapes(bad):
    x, w, t, m = make_case(0, 2, 4, 3, 5, torch.float32)
    if bad == "w_cols":
        w = torch.randn(5, 4)
    elif bad == "w_1d":
        w = torch.randn(15)
    elif bad == "targets":
        t = t[:, :3]
    elif bad == "mask":
        m = m.reshape(-1)
    elif bad == "dtype":
        w = w.double()
    elif bad == "t_float":
        t = t.float()
    with pytest.raises(ValueError, match="^chunked_token_loss: "):
        chunked_token_loss(x, w, t, m, chunk=2)


def test_chunk_larger_than_n_and_empty():
    x, w, t, m = make_case(1, 1, 3, 4, 6, torch.float64)
    a = chunked_token_loss(x, w, t, m, chunk=10**9)
    b = plain(x, w, t, m)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    x0 = torch.randn(0, 3, 4, requires_grad=True)
    w0 = torch.randn(6, 4, requires_grad=True)
    loss, count = chunked_token_loss(x0, w0, torch.zeros(0, 3, dtype=torch.long), chunk=2)
    assert loss.item() == 0 and count.item() == 0
    gx, gw = torch.autograd.grad(loss, [x0, w0])
    assert gx.shape == x0.shape and gw.abs().sum() == 0




@pytest.mark.parametrize("N,V,C,chunk,dtype", [
    (512, 1000, 64, 64, torch.float32), (512, 1000, 64, 512, torch.float32),
    (512, 1000, 64, 64, torch.bfloat16), (512, 1000, 64, 512, torch.bfloat16),
    (512, 1000, 256, 16, torch.float16), (256, 500, 16, 100, torch.float64),
])
def test_the_measured_peak_is_the_ledgers_formula(N, V, C, chunk, dtype):
    peak = measure_peak(chunked_token_loss, N, V, C, dtype, chunk=chunk)
    expected = chunked_loss_bytes(N, chunk, V, C, compute_bytes=dtype.itemsize)["peak"]
    assert abs(peak - expected) <= 0.03 * expected, (peak, expected)


def test_liger_chunk_keeps_a_chunk_of_logits_about_as_big_as_the_features():
    assert liger_chunk(2048, 50257, 768) == 32  # Liger Kernel's choice at GPT-2's shape
    assert liger_chunk(1024, 256, 128) == 512
    assert liger_chunk(64, 256, 384) == 64  # logits smaller than the features: one chunk
    assert liger_chunk(7, 100, 100) == 7  # the power of two above N = 7 is 8: only the clamp to N gives 7
    for n, v, c in ((2048, 50257, 768), (1024, 256, 128), (64, 256, 384), (7, 100, 3), (3000, 50257, 768),
                    (7, 100, 100)):
        chunk = liger_chunk(n, v, c)
        # A chunk's logits are within a factor of two of x's N * C values (one token's row at least),
        # and a chunk is never longer than the tokens there are.
        assert chunk <= n, f"chunk {chunk} is longer than the {n} tokens"
        assert chunk * v >= n * c / 2, f"chunk {chunk}: its logits are under half of x ({n}, {v}, {c})"
        assert chunk * v <= 2 * n * c + v, f"chunk {chunk}: its logits are over twice x ({n}, {v}, {c})"


@pytest.mark.parametrize("policy", ["fp32", "mixed_bf16"])
@pytest.mark.parametrize("remat", [None, "all"])
def test_the_step_with_a_chunked_loss_matches_the_plain_step(policy, remat):
    # Through the whole model and step: the tied wte gets both its gradients, masks and
    # IGNORE_INDEX count, and the chunked and plain steps agree to rounding.
    cfg = fm.ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
    batch = fm.pad_sequences([list(range(1, 12)), list(range(5, 20)), [3, 4, 5]], 16)
    opt = fm.sgd(0.1)
    state = fm.init_train_state(fm.init_params(cfg, seed=1), opt, policy=policy)
    plain_step = fm.make_train_step(cfg, opt, policy=policy, remat=remat, accum_steps=2)
    chunk_step = fm.make_train_step(cfg, opt, policy=policy, remat=remat, accum_steps=2, loss_chunk=5)
    a, ma = plain_step(state, batch)
    b, mb = chunk_step(state, batch)
    eps = torch.finfo(torch.float32 if policy == "fp32" else torch.bfloat16).eps
    # One step of SGD at lr 0.1 moves params by 0.1 * grad; the gradients agree within a few eps
    # of the compute dtype relative to their size (|grad| < 1 here), so params within lr * 8 eps.
    fm.testing.assert_trees_close(b.params, a.params, rtol=0, atol=0.1 * 8 * eps)
    assert float(mb["tokens"]) == float(ma["tokens"]) == float(batch.mask.sum())
    torch.testing.assert_close(mb["loss"], ma["loss"], rtol=4 * eps, atol=0)


def test_without_grad_mode_only_the_loss_is_computed():
    x, w, t, m = make_case(2, 2, 8, 4, 9, torch.float64)
    with torch.no_grad():
        loss, count = chunked_token_loss(x, w, t, m, chunk=3)
    torch.testing.assert_close(loss, plain(x, w, t, m)[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- the head's gradient sink
def sunk(x, w, t, m, chunk, factor, prior):
    """(loss, grad_x, buffer): the loss differentiated with incoming gradient ``factor``, the head's
    gradient sent into a copy of ``prior``; the weight (detached) gets none from autograd."""
    x = x.detach().requires_grad_(True)
    buffer = prior.clone()
    f = torch.tensor(factor, dtype=torch.float64)
    loss, _ = chunked_token_loss(x, w.detach(), t, m, chunk=chunk, head_grad=HeadGradSink(buffer, f))
    (gx,) = torch.autograd.grad(loss * f.to(loss.dtype), [x])
    return loss.detach(), gx, buffer


@settings(max_examples=50, deadline=None)
@given(**case_params, factor=st.sampled_from([1.0, 2.0**-7, 3.0, 2.0**12]))
def test_a_sink_adds_the_factor_times_the_heads_gradient_float64(factor, **kw):
    x, w, t, m, chunk = _draw(**kw, dtype=torch.float64)
    prior = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(kw["seed"]))
    loss, gx, buffer = sunk(x, w, t, m, chunk, factor, prior)
    l0, _, gx0, gw0 = loss_and_grads(plain, x, w, t, m)
    torch.testing.assert_close(loss, l0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, factor * gx0, rtol=1e-10, atol=1e-10 * factor)
    torch.testing.assert_close(buffer, prior + factor * gw0, rtol=1e-10, atol=1e-10 * max(factor, 1.0))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_a_bfloat16_sink_is_nearer_the_exact_gradient_than_autograds_route(chunk):
    """The sink adds each chunk's bf16 product, scaled in float32, into a float32 buffer; autograd's
    route also rounds the summed gradient to bf16 once, and again when scaling it by the incoming
    gradient. So the sink is within the same 8 eps_bf of the float64 evaluation of the same bf16
    inputs as the plain bf16 path, and no further from it than the chunked route without a sink.
    V is above the sink's rows, so the head is added in several slices."""
    eps_bf = torch.finfo(torch.bfloat16).eps
    x, w, t, m = make_case(11, 2, 64, 16, 2 * 4096 + 300, torch.bfloat16)
    assert sink_rows(chunk, w.shape[0], w.shape[1]) < w.shape[0] or chunk > 7  # small chunks: several slices
    factor = 3.0 / 128
    loss, gx, buffer = sunk(x, w, t, m, chunk, factor, torch.zeros(w.shape))
    _, _, gx_route, gw_route = loss_and_grads(chunked_token_loss, x, w, t, m, chunk=chunk)
    _, _, gx64, gw64 = loss_and_grads(plain, x.double(), w.double(), t, m)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert buffer.dtype == torch.float32
    got, route = rel(buffer / factor, gw64), rel(gw_route, gw64)
    assert got <= 8 * eps_bf and got <= route, (got, route)
    assert rel(gx / factor, gx64) <= rel(gx_route, gx64) + 8 * eps_bf


def test_a_sink_needs_a_float_buffer_of_the_heads_shape():
    x, w, t, m = make_case(0, 1, 4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="float32 or float64"):
        HeadGradSink(torch.zeros(5, 3, dtype=torch.bfloat16), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"buffer must have the weight's shape \(5, 3\)"):
        chunked_token_loss(x, w, t, m, chunk=2, head_grad=HeadGradSink(torch.zeros(3, 5), torch.tensor(1.0)))


@pytest.mark.parametrize("N,V,C,chunk,dtype", [
    (512, 5000, 16, 64, torch.bfloat16), (512, 1000, 64, 64, torch.float32), (512, 9000, 32, 8, torch.float16),
])
def test_with_a_sink_no_head_sized_buffer_is_made_and_the_peak_is_the_ledgers(N, V, C, chunk, dtype):
    x, w, t, m = make_case(0, 2, N // 2, C, V, dtype, pad=False)
    x.requires_grad_(True)
    buffer = torch.zeros(V, C)
    with LiveStorageTracker([x, w, t, m, buffer]) as tracker:
        loss, _ = chunked_token_loss(x, w, t, m, chunk=chunk, head_grad=HeadGradSink(buffer, torch.tensor(0.5)))
        (gx,) = torch.autograd.grad(loss * 0.5, [x])
        del loss
    expected = chunked_loss_bytes(N, chunk, V, C, compute_bytes=dtype.itemsize, direct=True)["peak"]
    assert abs(tracker.peak - expected) <= 0.03 * expected, (tracker.peak, expected)
    # Autograd's route holds the float32 sum of the head's gradient (V x C) beside the same chunk
    # (and a 0-d tensor or two fewer: 64 bytes of slack).
    route = measure_peak(chunked_token_loss, N, V, C, dtype, chunk=chunk)
    assert route - tracker.peak >= V * C * 4 - 64, (tracker.peak, route)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_a_fresh_sink_is_written_over_giving_the_values_of_a_sink_of_zeros(dtype, chunk):
    # The step's first micro-batch hands the loss an unfilled buffer (no (V, C) zero fill): the
    # first chunk writes its part, the rest add. Bit for bit what adding into zeros gives, whatever
    # the buffer held (NaN here); cleared once written.
    x, w, t, m = make_case(3, 2, 5, 6, 9, dtype)
    f = torch.tensor(0.25)
    zeros, junk = torch.zeros(9, 6), torch.full((9, 6), float("nan"))
    sinks = HeadGradSink(zeros, f), HeadGradSink(junk, f, fresh=True)
    for sink in sinks:
        loss, _ = chunked_token_loss(x.detach().requires_grad_(True), w.detach(), t, m, chunk=chunk, head_grad=sink)
    assert torch.equal(junk, zeros) and zeros.abs().sum() > 0
    assert not sinks[1].fresh


@pytest.mark.parametrize("grad", [True, False])
def test_a_fresh_sink_that_nothing_is_written_into_is_zeroed(grad):
    # No tokens at all, or no gradient asked for: the buffer must not keep what it held.
    buffer = torch.full((9, 6), float("nan"))
    x = torch.randn(1, 0 if grad else 4, 6, requires_grad=True)
    with torch.set_grad_enabled(grad):
        chunked_token_loss(x, torch.randn(9, 6), torch.zeros(x.shape[:2], dtype=torch.long), chunk=2,
                           head_grad=HeadGradSink(buffer, torch.tensor(1.0), fresh=True))
    assert torch.equal(buffer, torch.zeros(9, 6))
