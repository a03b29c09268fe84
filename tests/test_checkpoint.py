import json
import os

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt.io import checkpoint as _checkpoint
from functional_memopt.io.checkpoint import (
    STATE_JSON,
    checkpoint_info,
    load_checkpoint,
    load_checkpoint_params,
    save_checkpoint,
)
from functional_memopt.io.tensor_files import DIGEST_KEY, atomic_save_safetensors
from functional_memopt.train.loss_scale import dynamic_loss_scale, no_op_loss_scale, static_loss_scale
from functional_memopt import adamw, chain, clip_by_global_norm, decay_mask, sgd
from functional_memopt.optim.schedules import warmup_cosine
from functional_memopt.train.step import init_train_state, make_train_step
from functional_memopt.testing import assert_trees_equal

CFG = fm.ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
DATA = torch.randint(0, 32, (400,), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def optimizer(n_steps):
    return adamw(warmup_cosine(3e-3, 2, n_steps, final=3e-4), weight_decay=0.1, mask=decay_mask)


def fresh_state(cfg, policy, n_steps, seed=0):
    # growth_interval 2 makes the loss scale move within a few steps, so its state matters.
    ls = dynamic_loss_scale(2.0**10, growth_interval=2)
    return init_train_state(fm.init_params(cfg, seed=seed), optimizer(n_steps), loss_scale=ls, policy=policy)


def without_checksum(run_dir):
    """state.json as versions before checksums wrote it (no sha256 fields)."""
    record = json.loads((run_dir / STATE_JSON).read_text())
    record.pop("sha256"), record.pop("json_sha256")
    (run_dir / STATE_JSON).write_text(json.dumps(record))


def run(step, state, start, stop):
    for i in range(start, stop):
        state, _ = step(state, fm.sample_batch(DATA, 4, 8, seed=1, index=i))
    return state


@given(st.integers(4, 6).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))),
       st.sampled_from(["fp32", "mixed_bf16"]))
def test_n_steps_straight_equal_k_steps_then_save_load_then_the_rest_bitwise(tmp_path_factory, n_k, policy):
    n, k = n_k
    run_dir = tmp_path_factory.mktemp("ckpt")
    step = make_train_step(CFG, optimizer(n), policy=policy, accum_steps=2, max_grad_norm=1.0)
    straight = run(step, fresh_state(CFG, policy, n), 0, n)

    first = run(step, fresh_state(CFG, policy, n), 0, k)
    save_checkpoint(run_dir, first, cfg=CFG, meta={"batch_index": k})
    like = fresh_state(CFG, policy, n, seed=123)  # other values, same structure
    loaded, meta = load_checkpoint(run_dir, like, cfg=CFG)
    assert_trees_equal(loaded, first)
    resumed = run(step, loaded, meta["batch_index"], n)

    assert_trees_equal(resumed.params, straight.params)
    assert_trees_equal(resumed.opt_state, straight.opt_state)
    assert_trees_equal(resumed.loss_scale, straight.loss_scale)
    assert_trees_equal(resumed, straight)
    assert int(resumed.step) == n


STATE_TYPES = {
    "adamw+dynamic": lambda p: init_train_state(
        p, adamw(1e-3), loss_scale=dynamic_loss_scale(2.0**5, growth_factor=3.0, backoff_factor=0.25,
                                                      growth_interval=7, min_loss_scale=0.5)),
    "chain+static": lambda p: init_train_state(
        p, chain(clip_by_global_norm(1.0), adamw(1e-3)), loss_scale=static_loss_scale(128.0)),
    "sgd-momentum+noop": lambda p: init_train_state(p, sgd(0.1, momentum=0.9), loss_scale=no_op_loss_scale()),
    "sgd-plain": lambda p: init_train_state(p, sgd(0.1)),
    "bf16-params": lambda p: init_train_state(p, adamw(1e-3), policy="bf16"),
}


def perturbed(state, seed):
    """Every leaf given a non-default value a training step could have produced (counts, scales and
    moments all differ from init; the optimizer counts equal the step, the loss-scale counter stays
    below its interval and the backoff factor below 1)."""
    g = torch.Generator().manual_seed(seed)
    flat = fmtree.tree_flatten_with_paths(state)
    steps = int(torch.randint(1, 100, (), generator=g))

    def change(key, x):
        if key == "step" or key.endswith(".count"):
            return torch.full_like(x, steps)
        if key == "loss_scale.backoff_factor":
            return x * 0.5
        if x.is_floating_point():
            return (x.float() + torch.rand(x.shape, generator=g) + 0.5).to(x.dtype)
        return x + torch.randint(1, 100, x.shape, generator=g).to(x.dtype)

    new = {k: change(k, v) for k, v in flat.items()}
    if "loss_scale.counter" in new:
        new["loss_scale.counter"] = new["loss_scale.growth_interval"] - 1
    return optree.tree_unflatten(optree.tree_structure(state), list(new.values()))


@pytest.mark.parametrize("kind", sorted(STATE_TYPES))
def test_every_state_type_round_trips_with_non_default_values(tmp_path, kind):
    state = perturbed(STATE_TYPES[kind](fm.init_params(CFG, seed=0)), seed=1)
    save_checkpoint(tmp_path, state, cfg=CFG, meta={"note": kind})
    loaded, meta = load_checkpoint(tmp_path, STATE_TYPES[kind](fm.init_params(CFG, seed=5)))
    assert type(loaded) is type(state) and type(loaded.loss_scale) is type(state.loss_scale)
    assert_trees_equal(loaded, state)
    assert meta == {"note": kind}


def test_the_checkpoint_holds_every_leaf_by_name_and_the_record_fields(tmp_path):
    state = STATE_TYPES["adamw+dynamic"](fm.init_params(CFG))
    save_checkpoint(tmp_path, state, cfg=CFG, meta={"batch_index": 3})
    info = checkpoint_info(tmp_path)
    tensors = load_file(tmp_path / info["tensors"])
    assert set(tensors) == set(fmtree.tree_flatten_with_paths(state)) == set(info["leaves"])
    assert {"step", "params.wte", "opt_state.mu.wte", "loss_scale.min_loss_scale"} <= set(tensors)
    assert tensors["loss_scale.growth_factor"].dtype == torch.float64
    assert info["config"] == CFG.to_dict() and info["format_version"] == 1 and info["library_version"]
    assert info["meta"] == {"batch_index": 3}
    assert "rng" not in info  # nothing reads a global RNG, so none is stored


def test_a_new_checkpoint_replaces_the_old_and_leaves_one_tensor_file(tmp_path):
    make = STATE_TYPES["adamw+dynamic"]
    save_checkpoint(tmp_path, make(fm.init_params(CFG, seed=0)), cfg=CFG, meta={"n": 1})
    newer = perturbed(make(fm.init_params(CFG, seed=0)), seed=2)
    save_checkpoint(tmp_path, newer, cfg=CFG, meta={"n": 2})
    loaded, meta = load_checkpoint(tmp_path, newer)
    assert meta == {"n": 2}
    assert_trees_equal(loaded, newer)
    tensor_files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert tensor_files == [checkpoint_info(tmp_path)["tensors"]]


def test_a_crash_before_the_json_is_written_leaves_the_previous_checkpoint_complete(tmp_path, monkeypatch):
    make = STATE_TYPES["adamw+dynamic"]
    old = make(fm.init_params(CFG, seed=0))
    save_checkpoint(tmp_path, old, cfg=CFG, meta={"n": 1})

    def crash(path, record):
        raise OSError("disk full")

    monkeypatch.setattr(_checkpoint, "_write_json", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, perturbed(old, seed=3), cfg=CFG, meta={"n": 2})
    monkeypatch.undo()
    loaded, meta = load_checkpoint(tmp_path, old)
    assert meta == {"n": 1}
    assert_trees_equal(loaded, old)


def test_a_checkpoint_of_another_config_is_refused_listing_the_mismatched_keys(tmp_path):
    save_checkpoint(tmp_path, STATE_TYPES["sgd-plain"](fm.init_params(CFG)), cfg=CFG)
    other = fm.ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=24)
    like = STATE_TYPES["sgd-plain"](fm.init_params(other))
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path, like)
    assert "missing keys [params.h.1." in str(err.value)
    assert "params.h.0.ln_1.weight: checkpoint float32[16], expected float32[24]" in str(err.value)
    with pytest.raises(ValueError, match="n_layer: checkpoint 1, expected 2"):
        load_checkpoint(tmp_path, like, cfg=other)


def test_a_checkpoint_of_another_optimizer_or_policy_is_refused(tmp_path):
    save_checkpoint(tmp_path, STATE_TYPES["sgd-plain"](fm.init_params(CFG)), cfg=CFG)
    with pytest.raises(ValueError, match=r"missing keys \[opt_state\.mu\."):
        load_checkpoint(tmp_path, STATE_TYPES["adamw+dynamic"](fm.init_params(CFG)))
    save_checkpoint(tmp_path, STATE_TYPES["bf16-params"](fm.init_params(CFG)), cfg=CFG)
    with pytest.raises(ValueError, match="checkpoint bfloat16.*expected float32"):
        load_checkpoint(tmp_path, init_train_state(fm.init_params(CFG), adamw(1e-3)))


def test_missing_files_are_reported_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_checkpoint(tmp_path, STATE_TYPES["sgd-plain"](fm.init_params(CFG)))
    with pytest.raises(FileNotFoundError, match="no directory"):
        load_checkpoint(tmp_path / "nope", STATE_TYPES["sgd-plain"](fm.init_params(CFG)))
    state = STATE_TYPES["sgd-plain"](fm.init_params(CFG))
    save_checkpoint(tmp_path, state, cfg=CFG)
    os.unlink(tmp_path / checkpoint_info(tmp_path)["tensors"])
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_checkpoint(tmp_path, state)


def test_a_truncated_tensor_file_or_garbled_json_is_reported_as_corrupted(tmp_path):
    state = STATE_TYPES["sgd-plain"](fm.init_params(CFG))
    save_checkpoint(tmp_path, state, cfg=CFG)
    path = tmp_path / checkpoint_info(tmp_path)["tensors"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path, state)
    (tmp_path / STATE_JSON).write_text('{"format": "functional_memopt.checkpoint", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(tmp_path, state)


def test_non_finite_values_are_named_on_load_and_refused_on_save(tmp_path):
    state = STATE_TYPES["adamw+dynamic"](fm.init_params(CFG))
    save_checkpoint(tmp_path, state, cfg=CFG)
    info = checkpoint_info(tmp_path)
    path = tmp_path / info["tensors"]
    tensors = load_file(path)
    tensors["opt_state.nu.wpe"][0, 0] = float("nan")
    save_file(tensors, path, metadata={"functional_memopt.checkpoint_id": info["id"]})
    without_checksum(tmp_path)  # as an earlier version wrote it: the values are checked
    with pytest.raises(ValueError, match=r"inf or nan values in \['opt_state.nu.wpe'\]"):
        load_checkpoint(tmp_path, state)
    save_checkpoint(tmp_path, state, cfg=CFG)
    bad = state._replace(params={**state.params, "wte": state.params["wte"] * float("inf")})
    with pytest.raises(ValueError, match=r"inf or nan values in \['params.wte'\]"):
        save_checkpoint(tmp_path, bad, cfg=CFG)
    load_checkpoint(tmp_path, state)  # the refused save left the good checkpoint in place


def test_a_tensor_file_of_another_checkpoint_is_refused(tmp_path):
    state = STATE_TYPES["sgd-plain"](fm.init_params(CFG))
    save_checkpoint(tmp_path, state, cfg=CFG)
    without_checksum(tmp_path)  # as an earlier version wrote it: the ids still tell the files apart
    record = json.loads((tmp_path / STATE_JSON).read_text())
    record["id"] = "0" * 16
    (tmp_path / STATE_JSON).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="checkpoint ids differ"):
        load_checkpoint(tmp_path, state)


def test_load_checkpoint_params_gives_the_float32_params_and_config(tmp_path):
    state = perturbed(STATE_TYPES["adamw+dynamic"](fm.init_params(CFG)), seed=4)
    save_checkpoint(tmp_path, state, cfg=CFG)
    params, cfg = load_checkpoint_params(tmp_path)
    assert cfg == CFG
    assert_trees_equal(params, state.params)


def test_save_checkpoint_refuses_a_missing_folder_and_unserialisable_meta(tmp_path):
    state = STATE_TYPES["sgd-plain"](fm.init_params(CFG))
    with pytest.raises(ValueError, match="not a directory"):
        save_checkpoint(tmp_path / "missing", state, cfg=CFG)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, state, cfg=CFG, meta={"x": object()})
    assert os.listdir(tmp_path) == []


def edit_checkpoint(run_dir, change):
    """Rewrite a checkpoint's tensors with ``change`` as an earlier version would have (no checksums)."""
    info = checkpoint_info(run_dir)
    path = run_dir / info["tensors"]
    flat = load_file(path)
    change(flat)
    save_file(flat, path, metadata={"functional_memopt.checkpoint_id": info["id"]})
    record = json.loads((run_dir / STATE_JSON).read_text())
    record.pop("sha256"), record.pop("json_sha256")
    (run_dir / STATE_JSON).write_text(json.dumps(record))


@pytest.mark.parametrize("kind, change, match", [
    ("adamw+dynamic", lambda f: f["opt_state.count"].fill_(3), r"optimizer count of ScaleByAdamState is 3, expected "
                                                                r"equal to step \(5\)"),
    ("sgd-momentum+noop", lambda f: f["opt_state.count"].fill_(-1), r"optimizer count of SgdState is -1"),
    ("adamw+dynamic", lambda f: f["opt_state.nu.h.0.mlp.c_fc.weight"].__setitem__((0, 0), -1e-30),
     r"AdamW's second moments hold negative values \(down to -1e-30\)"),
    ("adamw+dynamic", lambda f: f["loss_scale.counter"].fill_(7), r"loss_scale.counter is 7, expected in \[0, "
                                                                   r"growth_interval=7\)"),
    ("adamw+dynamic", lambda f: f["loss_scale.backoff_factor"].fill_(1.5), r"backoff_factor is 1.5, expected in"),
    ("chain+static", lambda f: f["loss_scale.loss_scale"].fill_(-2.0), r"loss_scale.loss_scale is -2.0, expected > 0"),
])
def test_a_state_breaking_the_training_invariants_is_refused_on_load(tmp_path, kind, change, match):
    state = STATE_TYPES[kind](fm.init_params(CFG))
    state = state._replace(step=torch.tensor(5), opt_state=fmtree.tree_map(
        lambda x: torch.full_like(x, 5) if not x.is_floating_point() and x.dim() == 0 else x, state.opt_state))
    save_checkpoint(tmp_path, state, cfg=CFG)
    load_checkpoint(tmp_path, state)  # valid as saved
    edit_checkpoint(tmp_path, change)
    with pytest.raises(ValueError, match="breaks the invariants of a training state: .*" + match):
        load_checkpoint(tmp_path, state)


def test_the_checkpoint_records_and_verifies_its_tensor_file_sha256_and_its_own(tmp_path):
    state = STATE_TYPES["adamw+dynamic"](fm.init_params(CFG))
    save_checkpoint(tmp_path, state, cfg=CFG)
    info = checkpoint_info(tmp_path)
    assert len(info["sha256"]) == 64 and len(info["json_sha256"]) == 64
    path = tmp_path / info["tensors"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"the tensor file of the checkpoint at step 0 .* is damaged: its contents do "
                                         r"not match the sha256"):
        load_checkpoint(tmp_path, state)
    save_checkpoint(tmp_path, state, cfg=CFG)
    text = (tmp_path / STATE_JSON).read_text().replace('"step": 0', '"step": 1')
    (tmp_path / STATE_JSON).write_text(text)
    with pytest.raises(ValueError, match=r"state.json' is damaged: its contents do not match the sha256"):
        load_checkpoint(tmp_path, state)


def test_a_tensor_file_rewritten_and_resealed_after_the_save_is_not_the_file_the_record_names(tmp_path):
    # Sound on its own (its own sha256 matches, same checkpoint id), but not the bytes state.json recorded.
    state = STATE_TYPES["adamw+dynamic"](fm.init_params(CFG))
    save_checkpoint(tmp_path, state, cfg=CFG)
    info = checkpoint_info(tmp_path)
    path = tmp_path / info["tensors"]
    with safe_open(str(path), "pt") as f:
        meta, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    flat["params.wte"] = flat["params.wte"] + 1.0
    meta.pop(DIGEST_KEY)
    atomic_save_safetensors(path, flat, meta, caller="test")
    with pytest.raises(ValueError, match=r"is not the file its record names \(sha256 .*, expected "):
        load_checkpoint(tmp_path, state)
