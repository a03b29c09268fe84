import dataclasses

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.train.loss_scale import dynamic_loss_scale, static_loss_scale
from functional_memopt import adamw, sgd
from functional_memopt.train.step import TrainState, init_train_state, make_loss_fn, make_train_step

from _bounds import MomentumBound, l2, l2_difference
from _hypothesis import examples

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = fm.ModelConfig(vocab_size=32, block_size=12, n_layer=2, n_head=2, n_embd=16)


def _batch(cfg, B=4, T=None, seed=0, ragged=False):
    T = T or cfg.block_size
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    if not ragged:
        return fm.Batch(tokens, targets, torch.ones(B, T))
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    real = torch.arange(T)[None] < lengths[:, None]
    return fm.Batch(tokens, torch.where(real, targets, fm.IGNORE_INDEX), real.float(), real)


@examples(50)
@given(testing.configs(max_layer=2), st.data(), st.sampled_from([torch.float64, torch.float32]))
def test_micro_batches_accumulate_to_the_full_batch_gradient_with_ragged_masks(cfg, data, dtype):
    params = data.draw(testing.params(cfg, dtype=dtype))
    batch = data.draw(testing.ragged_batches(cfg, min_rows=1, max_rows=6))
    k = data.draw(testing.accumulation_steps(batch.size))
    testing.assert_accumulation_equivalent(make_loss_fn(cfg), params, batch, k)


@examples(50)
@given(st.integers(1, 6), st.integers(0, 1000))
def test_the_step_normalises_by_total_tokens_not_by_a_mean_of_means(k, seed):
    params = fmtree.tree_cast(fm.init_params(SMALL, seed=seed), torch.float64)
    batch = _batch(SMALL, B=6, seed=seed, ragged=True)
    opt = sgd(1.0)
    fp64 = "params=float64,compute=float64,output=float64"
    one = make_train_step(SMALL, opt, policy=fp64)
    many = make_train_step(SMALL, opt, policy=fp64, accum_steps=k)
    s1, m1 = one(init_train_state(params, opt), batch)
    sk, mk = many(init_train_state(params, opt), batch)
    testing.assert_trees_close(sk.params, s1.params, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mk["loss"], m1["loss"], rtol=1e-10, atol=0)
    assert float(mk["tokens"]) == float(batch.mask.sum())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("ls", ["none", "dynamic"])
def test_a_step_with_nonfinite_gradients_changes_nothing_but_the_loss_scale(bad, ls):
    opt = adamw(fm.warmup_cosine(1e-3, 2, 10))
    loss_scale = dynamic_loss_scale(2.0**8) if ls == "dynamic" else None
    state = init_train_state(fm.init_params(SMALL), opt, loss_scale=loss_scale)
    good = make_train_step(SMALL, opt, accum_steps=2, max_grad_norm=1.0)
    state, _ = good(state, _batch(SMALL, seed=1))  # nonzero optimizer state and count
    bad_step = make_train_step(SMALL, opt, accum_steps=2, max_grad_norm=1.0,
                               loss_fn=testing.poison(make_loss_fn(SMALL), bad))
    metrics = testing.assert_skipped_step_is_noop(bad_step, state, _batch(SMALL, seed=2))
    new, _ = bad_step(state, _batch(SMALL, seed=2))
    if ls == "dynamic":
        assert float(new.loss_scale.loss_scale) == float(state.loss_scale.loss_scale) / 2
    assert bool(metrics["skipped"]) and not torch.isfinite(metrics["grad_norm"])


def test_fp16_overflow_is_skipped_and_the_scale_backs_off_until_steps_succeed():
    opt = adamw(1e-3)
    state = init_train_state(fm.init_params(SMALL), opt, loss_scale=dynamic_loss_scale(2.0**40, growth_interval=3))
    step = make_train_step(SMALL, opt, policy="mixed_fp16")
    skipped = []
    for i in range(40):
        state, m = step(state, _batch(SMALL, seed=i))
        skipped.append(bool(m["skipped"]))
    assert skipped[0] and not all(skipped) and not skipped[-1]
    assert int(state.step) == skipped.count(False)
    assert float(state.loss_scale.loss_scale) < 2.0**40


@given(testing.policies(reduced_only=True), st.integers(0, 100))
def test_reduced_precision_loss_and_gradients_stay_within_epsilon_tolerances(policy, seed):
    cfg = SMALL
    testing.assert_precision_close(make_loss_fn(cfg), fm.init_params(cfg, seed=seed), _batch(cfg, seed=seed), policy)


# Relative errors need gradients that are not mostly cancellation (testing/tolerances.py).
precise_configs = testing.configs(max_layer=2, max_head=2, min_head_dim=4, max_head_dim=6, max_block=8,
                                  vocab_size=None).filter(lambda c: c.vocab_size >= 16)


@examples(25)
@given(precise_configs, st.data(), st.sampled_from(["mixed_bf16", "mixed_fp16"]), st.sampled_from(["cast", "autocast"]))
def test_mixed_precision_steps_track_the_fp32_trajectory_within_an_epsilon_bound(cfg, data, policy, mode):
    # SGD with momentum moves the params by lr times the gradient history, so the trajectories
    # differ by lr times the history of the gradients' difference. Each mixed-precision gradient is
    # within rho = GRAD_TOLERANCE_FACTOR epsilons of the compute dtype of the float32 gradient
    # (relative L2, testing/tolerances.py); tests/_bounds.py sums that over the momentum history,
    # adds a float32 rounding of the params a step and doubles it for the params' own difference.
    # The rate keeps most updates (lr |g| ~ 1e-6) below half an ulp of the compute dtype at
    # init-scale weights (6e-5 in bfloat16, 8e-6 in float16): a step whose masters round to it
    # loses them (or moves by rounding), and one that never updates has an error of 100%; the bound
    # is 2 * rho = 1/8 (bfloat16) or 1/64 (float16) of the trajectory's length.
    lr, momentum, steps = 1e-4, 0.9, 3
    rows = data.draw(st.integers(1, 4))
    batches = [data.draw(testing.masked_batches(cfg, min_rows=rows, max_rows=rows)) for _ in range(steps)]
    k = data.draw(st.integers(1, rows))
    params = fm.init_params(cfg, seed=data.draw(st.integers(0, 2**16)))
    opt = sgd(lr, momentum=momentum)
    ref = make_train_step(cfg, opt, accum_steps=k)
    low = make_train_step(cfg, opt, policy=policy, policy_mode=mode, accum_steps=k)
    s_ref = init_train_state(params, opt)
    s_low = init_train_state(params, opt, loss_scale=static_loss_scale(2.0**10) if policy == "mixed_fp16" else None)
    rho = testing.tolerance(fm.get_policy(policy).compute_dtype, factor=testing.GRAD_TOLERANCE_FACTOR)
    bound = MomentumBound(lr, momentum)
    for batch in batches:
        s_ref, m_ref = ref(s_ref, batch)
        s_low, m_low = low(s_low, batch)
        assert not bool(m_low["skipped"])
        allowed = bound.step(rho, float(m_ref["grad_norm"]), l2(s_ref.params))
        err = l2_difference(s_low.params, s_ref.params)
        assert err <= allowed, f"{policy} {mode}: params {err:.3e} from the fp32 trajectory, bound {allowed:.3e}"
        assert allowed < l2_difference(s_ref.params, params)  # tighter than the trajectory: a frozen step fails
    assert fmtree.tree_map(lambda p: p.dtype, s_low.params) == fmtree.tree_map(lambda p: p.dtype, s_ref.params)


def test_step_never_mutates_its_inputs_and_donation_gives_the_same_result():
    opt = adamw(1e-3, weight_decay=0.1)
    state = init_train_state(fm.init_params(SMALL), opt, loss_scale=dynamic_loss_scale(2.0**4))
    batch = _batch(SMALL, ragged=True)
    snapshot = optree.tree_map(torch.clone, state)
    pure, _ = make_train_step(SMALL, opt, accum_steps=2, max_grad_norm=0.5)(state, batch)
    testing.assert_trees_equal(state, snapshot)
    donated_in = optree.tree_map(torch.clone, state)
    donated, _ = make_train_step(SMALL, opt, accum_steps=2, max_grad_norm=0.5, donate=True)(donated_in, batch)
    testing.assert_trees_equal(donated, pure)
    # Donated, the new params and moments are the given tensors, updated in place: no second copy.
    for new, given in zip(optree.tree_leaves((donated.params, donated.opt_state.mu, donated.opt_state.nu)),
                          optree.tree_leaves((donated_in.params, donated_in.opt_state.mu, donated_in.opt_state.nu))):
        assert new.data_ptr() == given.data_ptr()


@pytest.mark.parametrize("variant", [dict(remat="all"), dict(remat=2), dict(engine="func"), dict(policy_mode="autocast")])
def test_step_variants_match_the_plain_step(variant):
    opt = adamw(1e-3)
    state = init_train_state(fm.init_params(SMALL), opt)
    batches = [_batch(SMALL, seed=i, ragged=True) for i in range(3)]
    testing.assert_steps_equivalent(make_train_step(SMALL, opt, accum_steps=2, **variant),
                                    make_train_step(SMALL, opt, accum_steps=2), state, batches,
                                    rtol=1e-6, atol=1e-6)


def test_a_train_state_of_an_empty_tree_starts_at_step_zero():
    state = init_train_state({}, sgd(0.1))
    assert state.step.dtype == torch.int64 and int(state.step) == 0 and state.params == {}


def test_a_train_state_starts_on_the_params_device():
    # The meta device stands in for an accelerator: its tensors hold no data but keep their device.
    params = optree.tree_map(lambda x: x.to("meta"), fm.init_params(SMALL))
    state = init_train_state(params, adamw(1e-3))
    assert state.step.device.type == state.opt_state.count.device.type == "meta"


def test_the_loss_of_make_loss_fn_rematerialises_the_blocks_it_is_given():
    # Under remat="all" the forward saves only each block's input for the backward, not the
    # activations inside the blocks: fewer bytes, the same loss.
    def saved_bytes(loss):
        total = []

        def pack(t):
            total.append(t.untyped_storage().nbytes())
            return t

        params = optree.tree_map(lambda x: x.requires_grad_(), fm.init_params(SMALL))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = loss(params, _batch(SMALL))
        return sum(total), optree.tree_map(torch.Tensor.detach, out)

    plain, out = saved_bytes(make_loss_fn(SMALL))
    remat, out_remat = saved_bytes(make_loss_fn(SMALL, remat="all"))
    testing.assert_trees_equal(out_remat, out)
    assert remat < plain / 2, (remat, plain)


def test_train_state_round_trips_through_flatten_with_non_default_values():
    opt = adamw(1e-3)
    state = init_train_state(fm.init_params(SMALL), opt, loss_scale=dynamic_loss_scale(2.0**5, growth_interval=7, min_loss_scale=2.0))
    state, _ = make_train_step(SMALL, opt)(state, _batch(SMALL))
    leaves, spec = optree.tree_flatten(state)
    back = optree.tree_unflatten(spec, leaves)
    testing.assert_trees_equal(back, state)
    assert isinstance(back, TrainState) and int(back.step) == 1 and int(back.loss_scale.growth_interval) == 7


def test_metrics_report_loss_tokens_scale_and_norm():
    opt = sgd(0.1)
    state = init_train_state(fm.init_params(SMALL), opt, loss_scale=static_loss_scale(2.0**3))
    batch = _batch(SMALL, ragged=True)
    _, m = make_train_step(SMALL, opt)(state, batch)
    s, c = make_loss_fn(SMALL)(state.params, batch)
    torch.testing.assert_close(m["loss"], s / c)
    assert float(m["tokens"]) == float(c) and float(m["loss_scale"]) == 8.0 and not bool(m["skipped"])
    assert set(m) == {"loss", "grad_norm", "loss_scale", "skipped", "nonfinite_update", "tokens"}
    assert m["nonfinite_update"].dtype == torch.bool and not bool(m["nonfinite_update"])
    g = torch.func.grad(lambda p: make_loss_fn(SMALL)(p, batch)[0] / c)(state.params)
    torch.testing.assert_close(m["grad_norm"], fmtree.tree_global_norm(g), rtol=1e-5, atol=1e-7)


def test_bad_step_arguments_are_rejected():
    with pytest.raises(ValueError, match="accum_steps"):
        make_train_step(SMALL, sgd(0.1), accum_steps=0)
    for bad in (2.0, True):
        with pytest.raises(ValueError, match="accum_steps must be an int"):
            make_train_step(SMALL, sgd(0.1), accum_steps=bad)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
            make_train_step(SMALL, sgd(0.1), max_grad_norm=bad)
    with pytest.raises(ValueError, match="between 1 and the batch size"):
        make_train_step(SMALL, sgd(0.1), accum_steps=5)(init_train_state(fm.init_params(SMALL), sgd(0.1)), _batch(SMALL, B=4))


def test_the_step_checks_ids_against_the_vocabulary_and_the_length_against_the_block_size():
    # The step runs the model unchecked, so these must be ValueErrors from the batch check, not an
    # IndexError from an embedding lookup.
    opt = sgd(0.1)
    state, step = init_train_state(fm.init_params(SMALL), opt), make_train_step(SMALL, opt)
    batch = _batch(SMALL)
    with pytest.raises(ValueError, match=r"^train step: batch.tokens holds the id 32, outside \[0, vocab_size=32\)"):
        step(state, batch._replace(tokens=batch.tokens.clone().fill_(32)))
    with pytest.raises(ValueError, match=r"^train step: batch.tokens has 13 positions, more than the model's block_size 12"):
        step(state, _batch(SMALL, T=13))


def test_half_precision_master_params_step_through_the_float32_fold():
    # The autograd engine's in-place fold refuses bfloat16 leaves; the step must take the general fold.
    opt = sgd(0.1)
    state = init_train_state(fm.init_params(SMALL), opt, policy="bf16")
    batch = _batch(SMALL, ragged=True)
    new, m = make_train_step(SMALL, opt, policy="bf16", accum_steps=2)(state, batch)
    ref, m_ref = make_train_step(SMALL, opt, policy="bf16", accum_steps=2, engine="func")(state, batch)
    assert int(new.step) == 1 and not bool(m["skipped"])
    assert all(x.dtype == torch.bfloat16 for x in optree.tree_leaves(new.params))
    testing.assert_trees_equal(new, ref)


def test_compile_hands_the_scaled_loss_and_its_options_to_torch_compile(monkeypatch):
    # torch.compile replaced by a recorder that returns the function as is: the compiled step is
    # then the eager step, bit for bit, and the options are the defaults with the caller's on top.
    seen = []

    def record(fn, **options):
        seen.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    opt = sgd(0.1)
    state, batch = init_train_state(fm.init_params(SMALL), opt), _batch(SMALL, ragged=True)
    compiled = make_train_step(SMALL, opt, accum_steps=2, compile={"mode": "max-autotune"})
    assert seen == [{"fullgraph": True, "dynamic": False, "mode": "max-autotune"}]
    testing.assert_trees_equal(compiled(state, batch), make_train_step(SMALL, opt, accum_steps=2)(state, batch))
    with pytest.raises(ValueError, match="engine='autograd'"):
        make_train_step(SMALL, opt, compile=True, engine="func")


def test_the_step_with_a_loss_chunk_never_makes_the_whole_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
            return out

    cfg = fm.ModelConfig(vocab_size=256, block_size=8, n_layer=1, n_head=2, n_embd=8)
    opt = sgd(0.1)
    state, batch = init_train_state(fm.init_params(cfg), opt), _batch(cfg)
    largest = Largest()
    with largest:
        chunked, _ = make_train_step(cfg, opt, loss_chunk=8)(state, batch)
    assert largest.numel < 4 * 8 * 256  # the (B, T, V) logits; the next largest is wte, (V, C)
    whole, _ = make_train_step(cfg, opt)(state, batch)
    testing.assert_trees_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_the_mixed_precision_step_casts_each_blocks_params_just_in_time():
    # Under remat only one block's bfloat16 copy (and its gradients while its backward runs) is
    # alive beside the embeddings' copies, not a copy of the whole model (tests/test_jit_cast.py).
    from functional_memopt.memory.measure import TensorMemoryTracker

    class Bf16Tracker(TensorMemoryTracker):
        def track(self, tree):
            return super().track([t for t in torch.utils._pytree.tree_leaves(tree)
                                  if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16])

    cfg = fm.ModelConfig(vocab_size=32, block_size=4, n_layer=6, n_head=2, n_embd=64)
    opt = sgd(0.1)
    state = init_train_state(fm.init_params(cfg), opt, policy="mixed_bf16")
    batch = fm.Batch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4))
    tracker = Bf16Tracker()
    with tracker:
        make_train_step(cfg, opt, policy="mixed_bf16", remat="all")(state, batch)
    n_all = sum(x.numel() for x in optree.tree_leaves(state.params))
    n_block = sum(x.numel() for x in optree.tree_leaves(state.params["h"][0]))
    assert tracker.peak <= 2 * (n_all - 6 * n_block) + 1.1 * 2 * (2 * n_block) + 8192 < 2 * n_all


def _inf_updates():
    """An optimizer whose every update is inf: finite gradients, a non-finite step."""

    def update(updates, state, params=None, *, donate=False):
        return optree.tree_map(lambda u: torch.full_like(u, float("inf")), updates), state

    return fm.GradientTransformation(lambda params: (), update)


def test_a_nonfinite_update_is_skipped_and_raised_when_the_state_was_donated():
    opt = _inf_updates()
    state, batch = init_train_state(fm.init_params(SMALL), opt)._replace(step=torch.tensor(4)), _batch(SMALL)
    kept, m = make_train_step(SMALL, opt)(state, batch)
    testing.assert_trees_equal(kept, state)
    assert m["skipped"].dtype == m["nonfinite_update"].dtype == torch.bool
    assert bool(m["skipped"]) and bool(m["nonfinite_update"])
    with pytest.raises(fm.NonFiniteUpdateError, match=r"^train step: update 5 wrote inf or nan into \['params") as err:
        make_train_step(SMALL, opt, donate=True)(optree.tree_map(torch.clone, state), batch)
    assert err.value.step == 5 and "params.wte" in err.value.leaves


def _rank_zero_of_two(other_bad: int):
    """The one-process hooks as rank 0 of two ZeRO-1 ranks, the other holding no tokens and
    finding ``other_bad`` non-finite leaves in its optimizer shard. The step calls ``count`` twice:
    on its tokens, then on the number of non-finite leaves its guard found."""
    from functional_memopt.train.parallelism import single_process

    others = iter([0.0, float(other_bad)])
    return single_process()._replace(count=lambda x: x + next(others), zero_stage=1, world_size=2)


@pytest.mark.parametrize("other_bad", [0, 1])
def test_a_nonfinite_optimizer_shard_on_another_rank_skips_the_update_on_this_one(other_bad):
    opt = adamw(1e-3)
    state, batch = init_train_state(fm.init_params(SMALL), opt), _batch(SMALL)
    new, m = make_train_step(SMALL, opt, parallel=_rank_zero_of_two(other_bad))(state, batch)
    assert bool(m["nonfinite_update"]) == bool(m["skipped"]) == bool(other_bad)
    testing.assert_trees_equal(new, state if other_bad else make_train_step(SMALL, opt)(state, batch)[0])
    if other_bad:
        donated = make_train_step(SMALL, opt, donate=True, parallel=_rank_zero_of_two(other_bad))
        with pytest.raises(fm.NonFiniteUpdateError) as err:
            donated(optree.tree_map(torch.clone, state), batch)
        assert err.value.leaves == ["opt_state (another rank's shard)"]


def _step_gradient(cfg, params, batch, **kw):
    """The step's unscaled, normalised gradient, read off AdamW's first moment after one step
    (mu = (1 - beta1) g), with its metrics."""
    opt = adamw(1e-3, weight_decay=0.0)
    ls = dynamic_loss_scale(2.0**8) if kw.get("policy") == "mixed_fp16" else None
    state = init_train_state(params, opt, loss_scale=ls)
    new, m = make_train_step(cfg, opt, **kw)(state, batch)
    assert not bool(m["skipped"])
    return optree.tree_map(lambda mu: mu.double() / 0.1, new.opt_state.mu), m


@pytest.mark.parametrize("policy", ["mixed_bf16", "mixed_fp16"])
@pytest.mark.parametrize("accum_steps, remat", [(1, None), (3, "all"), (2, 1)])
def test_the_chunked_heads_gradient_in_the_accumulator_is_the_exact_tied_gradient(policy, accum_steps, remat):
    # Under a mixed policy with the chunked loss the head's gradient is added into the step's
    # float32 sum for wte in the forward, and the embeddings' gradient comes from the masters:
    # the tied wte must still get both, once each. Against the float64 gradient of the same
    # params (the reference module, outside the library's model code), every leaf is within the
    # compute dtype's gradient tolerance, as the whole-logits step is.
    from functional_memopt.testing.reference import ReferenceGPT

    cfg = fm.ModelConfig(vocab_size=512, block_size=16, n_layer=2, n_head=2, n_embd=16)
    params = fm.init_params(cfg, seed=3)
    batch = fm.sample_batch(fm.load_corpus() % 512, 6, 16, seed=2, index=0)
    batch = batch._replace(mask=(torch.arange(16) % 5 != 0).float().expand(6, 16).clone())
    model = ReferenceGPT.from_params(optree.tree_map(torch.Tensor.double, params), cfg)
    labels = torch.where(batch.mask.bool(), batch.targets, -100)
    loss = torch.nn.functional.cross_entropy(model(batch.tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    exact = model.tree({n: p.grad for n, p in model.named_parameters()})
    eps = torch.finfo(fm.get_policy(policy).compute_dtype).eps
    bound = testing.GRAD_TOLERANCE_FACTOR * eps
    kw = dict(policy=policy, accum_steps=accum_steps, remat=remat)
    sunk, m = _step_gradient(cfg, params, batch, loss_chunk=8, **kw)
    whole, m_whole = _step_gradient(cfg, params, batch, **kw)
    for name, tree in (("chunked", sunk), ("whole", whole)):
        err = l2_difference(tree, exact) / l2(exact)
        assert err <= bound, f"{name}: relative L2 error {err:.2e} of the whole gradient, bound {bound:.2e}"
        err = l2_difference(tree["wte"], exact["wte"]) / l2(exact["wte"])
        assert err <= bound, f"{name}: wte's relative error {err:.2e}, bound {bound:.2e}"
    assert abs(float(m["grad_norm"]) / float(m_whole["grad_norm"]) - 1) <= 2 * bound
    # Against autograd's route for the same chunked loss (a custom loss: the policy casts the tree
    # first and the head's gradient goes through the backward), wte differs only by the roundings
    # that route adds: its head sum to the compute dtype, that sum times the loss's gradient, and
    # the sum with the embedding's part (half an epsilon each), so within 4 epsilons.
    route, _ = _step_gradient(cfg, params, batch, policy=policy, accum_steps=accum_steps,
                              loss_fn=make_loss_fn(cfg, remat=remat, loss_chunk=8))
    err = l2_difference(sunk["wte"], route["wte"]) / l2(route["wte"])
    assert err <= 4 * eps, f"wte {err:.2e} from autograd's route, bound {4 * eps:.2e}"


@pytest.mark.parametrize("accum_steps, remat", [(1, None), (3, "all")])
def test_in_float64_the_chunked_heads_sink_gives_the_whole_logits_step(accum_steps, remat):
    # One dtype: the chunked head still sends its gradient into the fold's sum for wte (the model
    # holds the fold's own leaves), and the embeddings' part arrives by autograd. In float64 the
    # two steps agree to 1e-10, so a gradient counted twice, scaled twice or lost shows at once.
    cfg = fm.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16)
    params = optree.tree_map(torch.Tensor.double, fm.init_params(cfg, seed=4))
    batch = fm.sample_batch(fm.load_corpus() % 300, 6, 16, seed=1, index=0)
    opt = sgd(0.5)
    state = init_train_state(params, opt, loss_scale=static_loss_scale(2.0**5))
    kw = dict(accum_steps=accum_steps, remat=remat, policy="params=fp64,compute=fp64,output=fp64")
    chunked, m = make_train_step(cfg, opt, loss_chunk=7, **kw)(state, batch)
    whole, m_whole = make_train_step(cfg, opt, **kw)(state, batch)
    testing.assert_trees_close(chunked.params, whole.params, rtol=1e-10, atol=1e-12)
    assert abs(float(m["grad_norm"]) - float(m_whole["grad_norm"])) <= 1e-10 * float(m_whole["grad_norm"])
