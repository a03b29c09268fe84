"""Data parallel and ZeRO steps on 2 gloo ranks (127.0.0.1) against the single-process step.

Each multi-rank test starts its ranks as subprocesses of this file (``python test_distributed.py
<scenario> <dir>``) with torchrun's environment variables, waits for them within a deadline, and
reads what each rank saved. A scenario batches several checks into one process group, because
starting a group costs seconds; the comparisons with the single-process step run here.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.io.checkpoint import load_checkpoint
from functional_memopt.io.checkpoint import save_checkpoint
from functional_memopt.parallel.replicated import shard_batch
from functional_memopt.train.loss_scale import dynamic_loss_scale
from functional_memopt import adamw, chain, decay_mask, sgd
from functional_memopt.parallel.process_group import (
    RankFailed,
    assert_replicas_equal,
    init_distributed,
    on_rank_0,
    shutdown_distributed,
)
from functional_memopt.train.step import init_train_state, make_loss_fn, make_train_step
from functional_memopt.parallel.zero import _shard_opt_state, _state_owners, data_parallel, flat_layout

from _bounds import FirstMomentBound, MomentumBound, l2, l2_difference

CFG = fm.ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
DATA = torch.randint(0, 32, (400,), generator=torch.Generator().manual_seed(0))
FP64 = "params=float64,compute=float64,output=float64"
WORLD = 2
STEPS = 10
DEADLINE_S = 60


def optimizer():
    return adamw(fm.warmup_cosine(3e-3, 2, 20), weight_decay=0.1, mask=decay_mask)


SGD = sgd(0.1, momentum=0.9, weight_decay=0.01)


def loss_scale():
    return dynamic_loss_scale(2.0**10, growth_interval=3)


def global_batch(i: int, rows: int = 8):
    """Batch ``i``; odd batches are ragged, with far fewer tokens in the last rank's rows."""
    b = fm.sample_batch(DATA, rows, 8, seed=1, index=i)
    if i % 2 == 0:
        return b
    lengths = torch.tensor([8, 7, 8, 5][: rows // 2] + [2, 1, 3, 1][: rows // 2])  # (rows,)
    real = torch.arange(8)[None] < lengths[:, None]
    return fm.Batch(b.tokens, torch.where(real, b.targets, fm.IGNORE_INDEX), real.float(), real)


# ----------------------------------------------------------------------------- the rank side


def _steps(state, step, rank, start, stop, rows=8):
    metrics = []
    for i in range(start, stop):
        state, m = step(state, shard_batch(global_batch(i, rows), rank, WORLD))
        metrics.append(m)
    return state, metrics


def _scenario_steps(out: Path) -> dict:
    info = init_distributed(timeout_s=30)
    res = {}
    # One fp64 step on a ragged batch (rank 0 counts 15 tokens, rank 1 counts 3), 2 micro-batches a rank.
    params64 = fmtree.tree_cast(fm.init_params(CFG, seed=3), torch.float64)
    for z in (0, 1, 2):
        par = data_parallel(zero_stage=z)
        state = init_train_state(params64, adamw(1e-2), parallel=par, policy=FP64)
        batch = shard_batch(global_batch(1, rows=4), info.rank, WORLD)
        state, m = make_train_step(CFG, adamw(1e-2), parallel=par, policy=FP64, accum_steps=2)(state, batch)
        res[f"fp64-{z}"] = (par.gather(state, adamw(1e-2)), m)
    for z in (0, 1, 2):
        par = data_parallel(zero_stage=z)
        # Ten fp32 steps of SGD with momentum, 2 micro-batches a rank.
        state = init_train_state(fm.init_params(CFG), SGD, parallel=par, loss_scale=loss_scale())
        step = make_train_step(CFG, SGD, parallel=par, accum_steps=2, max_grad_norm=0.5)
        res[f"sgd-{z}"] = par.gather(_steps(state, step, info.rank, 0, STEPS)[0], SGD)
        # Ten fp32 steps of AdamW with a decay mask and a schedule, dynamic loss scale, clipping,
        # donated buffers (ZeRO then gathers the params in place), checking replicas every step.
        opt = optimizer()
        state = init_train_state(fm.init_params(CFG), opt, parallel=par, loss_scale=loss_scale())
        step = make_train_step(CFG, opt, max_grad_norm=0.5, donate=True,
                               parallel=data_parallel(zero_stage=z, check_replicas=True))
        state, metrics = _steps(state, step, info.rank, 0, STEPS)
        res[f"adam-{z}"] = (par.gather(state, opt), metrics, state.params)
        res[f"opt-bytes-{z}"] = fmtree.tree_bytes(state.opt_state)
        # Non-finite gradients on rank 1 only: every rank must skip, changing nothing but the scale.
        poisoned = testing.poison(make_loss_fn(CFG), float("inf") if info.rank == 1 else 1.0)
        bad = make_train_step(CFG, opt, parallel=par, max_grad_norm=0.5, loss_fn=poisoned)
        m = testing.assert_skipped_step_is_noop(bad, state, shard_batch(global_batch(STEPS), info.rank, WORLD))
        new, _ = bad(state, shard_batch(global_batch(STEPS), info.rank, WORLD))
        res[f"skip-{z}"] = (bool(m["skipped"]), float(state.loss_scale.loss_scale), float(new.loss_scale.loss_scale))
    # Work that fails on rank 0 alone stops every rank, not just rank 0.
    try:
        res["on-rank-0"] = on_rank_0(lambda: 1 // (info.rank * 0), what="dividing")
    except ZeroDivisionError:
        res["on-rank-0"] = "rank 0's own error"
    except RankFailed as err:
        res["on-rank-0"] = str(err)
    # A rank whose params drifted is caught by the replica check, on every rank.
    drifted = fmtree.tree_map(lambda p: p + info.rank * 1e-7, state.params)
    try:
        assert_replicas_equal(drifted)
        res["drift"] = None
    except RuntimeError as err:
        res["drift"] = str(err)
    shutdown_distributed()
    return res


def _scenario_checkpoint(out: Path) -> dict:
    info = init_distributed(timeout_s=30)
    opt, res, run_dir = optimizer(), {}, out / "run"
    if info.is_main:
        run_dir.mkdir()
    par = data_parallel(zero_stage=2)
    step = make_train_step(CFG, opt, parallel=par)
    fresh = init_train_state(fm.init_params(CFG), opt, parallel=par, loss_scale=loss_scale())
    state, _ = _steps(fresh, step, info.rank, 0, 3, rows=2)
    save_checkpoint(run_dir, state, cfg=CFG, meta={"next": 3}, parallel=par, optimizer=opt)
    unbroken, _ = _steps(state, step, info.rank, 3, 6, rows=2)
    res["unbroken"] = par.gather(unbroken, opt)
    for z in (2, 1, 0):  # resume into each layout on the same world size
        p = data_parallel(zero_stage=z)
        like = init_train_state(fm.init_params(CFG, seed=9), opt, parallel=p, loss_scale=loss_scale())
        loaded, meta = load_checkpoint(run_dir, like, cfg=CFG, parallel=p, optimizer=opt)
        resumed, _ = _steps(loaded, make_train_step(CFG, opt, parallel=p), info.rank, meta["next"], 6, rows=2)
        res[f"resumed-{z}"] = p.gather(resumed, opt)
    shutdown_distributed()
    return res


ORACLE_STEPS = 4
ORACLE_CLIP = 0.5
ORACLE_LR = {"sgd": 0.05, "adamw": 1e-2}


def _oracle_optimizers(name):
    """(the library's optimizer, torch's class and arguments) with the same hyper-parameters."""
    if name == "sgd":
        kw = dict(lr=ORACLE_LR["sgd"], momentum=0.9, weight_decay=0.01)
        return sgd(kw["lr"], momentum=0.9, weight_decay=0.01), torch.optim.SGD, kw
    kw = dict(lr=ORACLE_LR["adamw"], weight_decay=0.1)
    return adamw(kw["lr"], weight_decay=0.1), torch.optim.AdamW, kw


def _torch_data_parallel_run(params, name, zero, rank):
    """torch's own recipe: DDP over the reference module, no_sync for all but the last micro-batch,
    the loss normalised by the global token count, clip_grad_norm_, and torch.optim or
    ZeroRedundancyOptimizer (torch's ZeRO-1). Returns rank 0's params, first moments and metrics."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from functional_memopt.testing.reference import ReferenceGPT

    module = ReferenceGPT.from_params(params, CFG)
    model = DistributedDataParallel(module)
    _, cls, kw = _oracle_optimizers(name)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw) if zero else cls(model.parameters(), **kw)
    names = [n for n, _ in module.named_parameters()]
    out = []
    for i in range(ORACLE_STEPS):
        batch = shard_batch(global_batch(i), rank, WORLD)
        labels = batch.targets if batch.mask is None else torch.where(batch.mask.bool(), batch.targets, -100)
        count = (labels != -100).sum()
        dist.all_reduce(count)  # the global token count, known before the first backward
        pads = batch.attention_mask.tensor_split(2) if batch.attention_mask is not None else [None, None]
        parts = list(zip(batch.tokens.tensor_split(2), labels.tensor_split(2), pads))
        total = torch.zeros((), dtype=torch.float64)
        for j, (x, y, pad) in enumerate(parts):
            with model.no_sync() if j < len(parts) - 1 else contextlib.nullcontext():
                loss_sum = F.cross_entropy(model(x, attention_mask=pad).flatten(0, 1), y.flatten(), reduction="sum",
                                           ignore_index=-100)
                # DDP averages gradients over ranks: times the world size, they sum to the global gradient.
                (loss_sum / count * WORLD).backward()
            total += loss_sum.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ORACLE_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        mu = None
        if name == "adamw":
            if zero:
                opt.consolidate_state_dict(to=0)
                state = opt.state_dict()["state"] if rank == 0 else None
                mu = module.tree({n: state[j]["exp_avg"] for j, n in enumerate(names)}) if rank == 0 else None
            else:
                mu = module.tree({n: opt.state[p]["exp_avg"] for n, p in module.named_parameters()})
        out.append((module.params(), mu, {"loss": float(total) / int(count), "grad_norm": float(norm),
                                          "tokens": float(count)}))
    return out


def _scenario_oracle(out: Path) -> dict:
    info = init_distributed(timeout_s=30)
    res = {}
    params = fm.init_params(CFG, seed=4)
    for name in ("sgd", "adamw"):
        for z in (0, 1, 2):
            opt, _, _ = _oracle_optimizers(name)
            par = data_parallel(zero_stage=z)
            state = init_train_state(params, opt, parallel=par)
            step = make_train_step(CFG, opt, parallel=par, accum_steps=2, max_grad_norm=ORACLE_CLIP)
            runs = []
            for i in range(ORACLE_STEPS):
                state, m = step(state, shard_batch(global_batch(i), info.rank, WORLD))
                full = par.gather(state, opt)
                mu = full.opt_state.mu if full is not None and name == "adamw" else None
                runs.append((state.params, mu, {k: float(m[k]) for k in ("loss", "grad_norm", "tokens")}))
            res[f"lib-{name}-{z}"] = runs
        for zero in (False, True):
            res[f"torch-{name}-{'zero' if zero else 'ddp'}"] = _torch_data_parallel_run(params, name, zero, info.rank)
    shutdown_distributed()
    return res


def _scenario_failures(out: Path) -> dict:
    import datetime

    import torch.distributed as dist

    info = init_distributed(timeout_s=30)
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    if info.rank == 1:
        time.sleep(6)  # alive but not taking part: rank 0's collective on `short` times out
        os._exit(1)  # then dies: rank 0's next collective fails on a closed connection
    opt, res = sgd(0.1), {}
    for name, group in (("stuck", short), ("dead", None)):
        par = data_parallel(zero_stage=2, group=group)
        t0 = time.monotonic()
        try:
            state = init_train_state(fm.init_params(CFG), opt, parallel=par)
            make_train_step(CFG, opt, parallel=par)(state, shard_batch(global_batch(0), 0, WORLD))
            res[name] = (None, time.monotonic() - t0)
        except RuntimeError as err:
            res[name] = (str(err), time.monotonic() - t0)
    return res


def _scenario_alone(out: Path) -> dict:
    t0 = time.monotonic()
    try:
        init_distributed(timeout_s=3)
        return {"error": None, "seconds": time.monotonic() - t0}
    except RuntimeError as err:
        return {"error": str(err), "seconds": time.monotonic() - t0}


# ----------------------------------------------------------------------------- the test side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, tmp_path: Path, *, ranks=range(WORLD)) -> tuple[list, list]:
    """Run ``scenario`` on ``ranks`` of a world of 2; return each rank's result (None if it saved none) and exit code."""
    port, root = _free_port(), Path(__file__).resolve().parent.parent
    env = dict(os.environ, WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for r in ranks:
        log = open(tmp_path / f"log{r}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(tmp_path)], stdout=log,
                                      stderr=subprocess.STDOUT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
        log.close()
    deadline = time.monotonic() + DEADLINE_S
    try:
        codes = [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join((tmp_path / f"log{r}.txt").read_text()[-3000:] for r in ranks)
        pytest.fail(f"{scenario}: the ranks did not finish within {DEADLINE_S} s:\n{logs}")
    results = []
    for r in ranks:
        f = tmp_path / f"{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else None)
    return results, codes


def _results(scenario, tmp_path):
    results, codes = _launch(scenario, tmp_path)
    if codes != [0] * WORLD or None in results:
        logs = "\n".join((tmp_path / f"log{r}.txt").read_text()[-4000:] for r in range(WORLD))
        pytest.fail(f"{scenario}: exit codes {codes}:\n{logs}")
    return results


@contextlib.contextmanager
def one_thread():
    """Run as the ranks run: CPU kernels split their sums by thread, so bits depend on the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_process_run(opt, start, stop, state, *, rows=8, **kwargs):
    step = make_train_step(CFG, opt, **kwargs)
    metrics = []
    with one_thread():
        for i in range(start, stop):
            state, m = step(state, global_batch(i, rows))
            metrics.append(m)
    return state, metrics


def test_data_parallel_and_zero_steps_equal_the_single_process_step_and_skip_together(tmp_path):
    r0, r1 = _results("steps", tmp_path)
    fresh = init_train_state(fm.init_params(CFG), optimizer(), loss_scale=loss_scale())
    sgd_ref, _ = _single_process_run(SGD, 0, STEPS, fresh._replace(opt_state=SGD.init(fresh.params)),
                                     accum_steps=4, max_grad_norm=0.5)
    adam_ref, adam_metrics = _single_process_run(optimizer(), 0, STEPS, fresh, accum_steps=2, max_grad_norm=0.5)
    params64 = fmtree.tree_cast(fm.init_params(CFG, seed=3), torch.float64)
    fp64_ref, m_ref = make_train_step(CFG, adamw(1e-2), policy=FP64, accum_steps=4)(
        init_train_state(params64, adamw(1e-2), policy=FP64), global_batch(1, rows=4))
    for z in (0, 1, 2):
        # fp64, ragged: ranks with 15 and 3 tokens give the global token-weighted gradient.
        got, m = r0[f"fp64-{z}"]
        testing.assert_trees_close(got, fp64_ref, rtol=1e-10, atol=1e-12, msg=f"fp64 stage {z}: ")
        assert float(m["tokens"]) == float(m_ref["tokens"]) == 18.0
        torch.testing.assert_close(m["loss"], m_ref["loss"], rtol=1e-10, atol=0)
        # fp32, 2 micro-batches a rank: the sums associate differently, so equal to rounding.
        testing.assert_trees_close(r0[f"sgd-{z}"], sgd_ref, rtol=1e-6, atol=1e-6, msg=f"sgd stage {z}: ")
        # One micro-batch a rank: the all-reduce adds the two gradients the fold adds, so stages 0
        # and 1 are bit-identical; stage 2 sums the squared norm by shards, so clipping differs in
        # the last bit. (Params, full optimizer state, loss scale and step, gathered on rank 0.)
        got, metrics, _ = r0[f"adam-{z}"]
        if z < 2:
            testing.assert_trees_equal(got, adam_ref, msg=f"adamw stage {z}: ")
        testing.assert_trees_close(got, adam_ref, rtol=1e-6, atol=1e-6, msg=f"adamw stage {z}: ")
        assert [float(m["loss_scale"]) for m in metrics] == [float(m["loss_scale"]) for m in adam_metrics]
        torch.testing.assert_close(torch.stack([m["grad_norm"] for m in metrics]),
                                   torch.stack([m["grad_norm"] for m in adam_metrics]), rtol=1e-6, atol=0)
        assert r1[f"adam-{z}"][0] is None  # the full state is gathered on rank 0 only
        testing.assert_trees_equal(r1[f"adam-{z}"][2], r0[f"adam-{z}"][2], msg="ranks' params differ: ")
        # Poisoned on rank 1 only: both ranks skip, and the scale backs off on both.
        for r in (r0, r1):
            skipped, before, after = r[f"skip-{z}"]
            assert skipped and after == before / 2
    full = fmtree.tree_bytes(fresh.opt_state)
    assert r0["opt-bytes-0"] == full
    for z in (1, 2):  # each rank holds about half the optimizer state
        assert r0[f"opt-bytes-{z}"] + r1[f"opt-bytes-{z}"] <= full + 2 * 64
        assert max(r0[f"opt-bytes-{z}"], r1[f"opt-bytes-{z}"]) <= full // 2 + 64
    assert "ranks [1] differ from rank 0" in r0["drift"] and r1["drift"] == r0["drift"]
    assert r0["on-rank-0"] == "rank 0's own error" and "rank 0 failed while dividing" in r1["on-rank-0"]


def test_data_parallel_and_zero_steps_follow_torch_ddp_and_zero_redundancy_optimizer(tmp_path):
    # An outside oracle: torch's own DistributedDataParallel (stage 0) and ZeroRedundancyOptimizer
    # (stages 1 and 2, which differ in where gradients are reduced, not in the update) over the
    # reference module, on the same ragged global batches (odd ones leave 3 of 18 tokens to rank 1).
    # Bounds (tests/_bounds.py, as in test_parity.py): both sides do float32 arithmetic on the same
    # values in different orders, so gradients agree within 2 * GRAD_TOLERANCE_FACTOR * eps32, the
    # norm within that plus the rounding of two sums of numel squares, the loss within n eps32.
    r0, _ = _results("oracle", tmp_path)
    eps32 = torch.finfo(torch.float32).eps
    numel = sum(x.numel() for x in optree.tree_leaves(fm.init_params(CFG)))
    rho = 2 * testing.GRAD_TOLERANCE_FACTOR * eps32
    norm_tol = rho + numel * eps32 / 2
    for name in ("sgd", "adamw"):
        for z in (0, 1, 2):
            lib, ref = r0[f"lib-{name}-{z}"], r0[f"torch-{name}-{'ddp' if z == 0 else 'zero'}"]
            bound = MomentumBound(ORACLE_LR["sgd"], 0.9) if name == "sgd" else FirstMomentBound(0.9)
            for t, ((params, mu, m), (ref_params, ref_mu, ref_m)) in enumerate(zip(lib, ref)):
                where = f"{name}, stage {z}, step {t + 1}: "
                assert m["tokens"] == ref_m["tokens"], where + "tokens"
                assert abs(m["loss"] - ref_m["loss"]) <= m["tokens"] * eps32 * ref_m["loss"], where + "loss"
                assert abs(m["grad_norm"] - ref_m["grad_norm"]) <= norm_tol * ref_m["grad_norm"], where + "grad norm"
                coef = min(1.0, ORACLE_CLIP / (ref_m["grad_norm"] + 1e-6))
                rho_update = rho + (norm_tol if coef < 1 else 0.0)
                if name == "sgd":
                    allowed = bound.step(rho_update, coef * ref_m["grad_norm"], l2(ref_params))
                    err = l2_difference(params, ref_params)
                else:  # Adam's update normalises each element; its first moment is the gradient history
                    allowed = bound.step(rho_update, coef * ref_m["grad_norm"], l2(ref_mu))
                    err = l2_difference(mu, ref_mu)
                assert err <= allowed, where + f"differs from torch's by {err:.3e}, bound {allowed:.3e}"


def test_a_sharded_checkpoint_resumes_exactly_on_two_ranks_and_on_one(tmp_path):
    r0, r1 = _results("checkpoint", tmp_path)
    unbroken = r0["unbroken"]
    assert r1["unbroken"] is None
    # Same world size, any layout: bit-identical to the unbroken run.
    for z in (2, 1, 0):
        testing.assert_trees_equal(r0[f"resumed-{z}"], unbroken, msg=f"2 ranks, stage 2 -> {z}: ")
    # One process, the plain single-process state and step. With two ranks and one micro-batch
    # each, the all-reduce adds the same two gradients the single-process fold adds (a + b is
    # commutative), so even this resume is bit-identical; with more ranks or micro-batches the
    # sums associate differently and only agree to rounding.
    opt = optimizer()
    like = init_train_state(fm.init_params(CFG, seed=9), opt, loss_scale=loss_scale())
    state, meta = load_checkpoint(tmp_path / "run", like, cfg=CFG)
    single, _ = _single_process_run(opt, meta["next"], 6, state, rows=2, accum_steps=2)
    testing.assert_trees_equal(single, unbroken, msg="2 ranks -> 1 process: ")
    # The distributed loader in a single process (no process group) gives the same state.
    par = data_parallel(zero_stage=2)
    like = init_train_state(fm.init_params(CFG), opt, parallel=par, loss_scale=loss_scale())
    loaded, _ = load_checkpoint(tmp_path / "run", like, cfg=CFG, parallel=par, optimizer=opt)
    testing.assert_trees_equal(par.gather(loaded, opt), state)


def test_a_rank_that_dies_or_stalls_makes_the_others_fail_with_a_clear_error(tmp_path):
    (r0, _), codes = _launch("failures", tmp_path)
    assert codes == [0, 1]
    for name in ("stuck", "dead"):
        message, seconds = r0[name]
        assert message is not None and "failed on rank 0 of 2" in message and "Another rank probably died" in message
        assert seconds < 30  # bounded by the timeout, not the test's deadline


def test_a_rank_whose_peers_never_join_fails_after_the_timeout(tmp_path):
    (r0,), codes = _launch("alone", tmp_path, ranks=[0])
    assert codes == [0]
    assert "could not join the process group" in r0["error"] and "within 3 s" in r0["error"]


# ----------------------------------------------------------------------------- single process


@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=5), st.integers(1, 5))
def test_the_ranks_pieces_tile_the_flat_params_exactly_once(shapes, n):
    params = {f"p{i}": torch.arange(math.prod(s), dtype=torch.float32).view(s) + 100 * i
              for i, s in enumerate(shapes)}
    leaves = optree.tree_leaves(params)
    flat = torch.cat([x.reshape(-1) for x in leaves])
    layouts = [flat_layout(params, world_size=n, rank=r) for r in range(n)]
    tiled = torch.cat([torch.cat([p.reshape(-1) for p in lay.pieces(leaves)]) for lay in layouts])
    assert torch.equal(tiled, flat)
    for lay in layouts:  # a piece keeps its leaf's number of dimensions, so masks by ndim still work
        assert [p.dim() for p in lay.pieces(leaves)] == [max(1, x.dim()) for x in leaves]
        assert lay.world_size * lay.shard_size - lay.numel < n


@pytest.mark.parametrize("opt", [adamw(1e-3, mask=decay_mask), sgd(0.1, momentum=0.9), chain(sgd(0.1), adamw(1e-3))])
def test_optimizer_state_shards_concatenate_to_the_single_process_state(opt):
    params = fm.init_params(CFG)
    full = opt.update(fmtree.tree_map(torch.ones_like, params), opt.init(params), params)[1]
    shards = [_shard_opt_state(full, opt, flat_layout(params, world_size=3, rank=r)) for r in range(3)]
    _, owners = _state_owners(opt, flat_layout(params, world_size=3, rank=0))
    full_leaves = optree.tree_leaves(full)
    assert sum(o is not None for o in owners) == len(full_leaves) - sum(x.dim() == 0 for x in full_leaves)
    for j, x in enumerate(full_leaves):
        parts = [optree.tree_leaves(s)[j] for s in shards]
        if owners[j] is None:
            assert all(torch.equal(p, x) for p in parts)
        else:
            assert torch.equal(torch.cat([p.reshape(-1) for p in parts]), x.reshape(-1))


def test_without_a_process_group_every_stage_is_the_single_process_step():
    opt = optimizer()
    ref = init_train_state(fm.init_params(CFG), opt, loss_scale=loss_scale())
    ref, _ = _single_process_run(opt, 0, 4, ref, accum_steps=2, max_grad_norm=0.5)
    for z in (0, 1, 2):
        par = data_parallel(zero_stage=z)
        state = init_train_state(fm.init_params(CFG), opt, parallel=par, loss_scale=loss_scale())
        step = make_train_step(CFG, opt, parallel=par, accum_steps=2, max_grad_norm=0.5)
        with one_thread():
            for i in range(4):
                state, _ = step(state, global_batch(i))
        if z < 2:  # stage 2 takes the gradient norm shard by shard: the clip factor may differ in the last bit
            testing.assert_trees_equal(par.gather(state, opt), ref, msg=f"stage {z}: ")
        testing.assert_trees_close(par.gather(state, opt), ref, rtol=1e-6, atol=1e-7, msg=f"stage {z}: ")
        testing.assert_trees_equal(par.shard(par.gather(state, opt), opt), state)


def test_bad_distributed_arguments_are_rejected(monkeypatch):
    batch = global_batch(0, rows=2)
    with pytest.raises(ValueError, match="2 rows for 3 ranks"):
        shard_batch(batch, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        shard_batch(batch, 2, 2)
    assert shard_batch(batch, 1, 2).tokens.shape == (1, 8)
    with pytest.raises(ValueError, match="zero_stage must be 0, 1 or 2"):
        data_parallel(zero_stage=3)
    with pytest.raises(TypeError, match="one floating dtype"):
        flat_layout({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float64)}, world_size=2, rank=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        init_distributed()
    monkeypatch.delenv("WORLD_SIZE")
    assert init_distributed().world_size == 1


if __name__ == "__main__":  # a rank of a scenario, started by _launch
    torch.set_num_threads(1)
    _scenario, _out = sys.argv[1], Path(sys.argv[2])
    _result = globals()[f"_scenario_{_scenario}"](_out)
    torch.save(_result, _out / f"{os.environ['RANK']}.pt")
    if _scenario == "failures":  # tearing down a group with a dead peer may abort; the result is saved
        os._exit(0)
