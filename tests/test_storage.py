import errno
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt import testing
from functional_memopt.io.files import atomic_write, is_disk_full, leftovers
from functional_memopt.io.params import FORMAT_NAME, load_params, params_file_info, save_params
from functional_memopt.io.tensor_files import DIGEST_KEY

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SMALL = fm.ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=8)


def spread_params(cfg, seed):
    """Params whose magnitudes span many binades (1e-7 .. 1e4), so casts round and flush."""
    g = torch.Generator().manual_seed(seed)
    return fmtree.tree_map(
        lambda x: torch.randn(x.shape, generator=g) * torch.exp(torch.empty(x.shape).uniform_(-16, 8, generator=g)),
        fm.init_params(cfg, seed=seed),
    )


def header_bytes(path):
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def entries(folder):
    return sorted(os.listdir(folder))


@given(testing.configs(), st.sampled_from(DTYPES + ["fp16", "bf16", "fp32"]), st.integers(0, 2**31 - 1))
def test_loading_a_saved_file_gives_the_params_cast_to_the_stored_dtype_bitwise(cfg, dtype, seed):
    params = spread_params(cfg, seed)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype, dtype)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.safetensors")
        save_params(path, params, cfg, dtype=dtype)
        stored, cfg_stored = load_params(path, dtype=want)
        masters, _ = load_params(path)
    assert cfg_stored == cfg
    testing.assert_trees_equal(stored, fmtree.tree_cast(params, want))
    testing.assert_trees_equal(masters, fmtree.tree_map(lambda x: x.to(want).float(), params))


def test_save_params_stores_half_precision_by_default_and_leaves_the_input_untouched(tmp_path):
    params = fm.init_params(SMALL, seed=0)
    before = fmtree.tree_map(torch.clone, params)
    save_params(tmp_path / "p.safetensors", params, SMALL)
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert f.metadata()["functional_memopt.dtype"] == "float16"
    testing.assert_trees_equal(params, before)


def test_keys_are_the_tree_paths_and_the_tied_embedding_is_stored_once(tmp_path):
    params = fm.init_params(SMALL, seed=0)
    save_params(tmp_path / "p.safetensors", params, SMALL)
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sorted(keys) == sorted(fmtree.tree_flatten_with_paths(params))
    assert [k for k in keys if "wte" in k] == ["wte"]
    assert not any("lm_head" in k for k in keys)


def test_metadata_round_trips_the_config_and_names_format_and_version(tmp_path):
    cfg = fm.ModelConfig(vocab_size=40, block_size=12, n_layer=1, n_head=3, n_embd=12, bias=False,
                         layer_norm_eps=1e-6, init_std=0.05, mlp_ratio=2)
    save_params(tmp_path / "p.safetensors", fm.init_params(cfg), cfg, dtype="bf16")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        meta = f.metadata()
    assert fm.ModelConfig.from_dict(json.loads(meta["functional_memopt.config"])) == cfg
    assert meta["functional_memopt.format"] == FORMAT_NAME
    assert meta["functional_memopt.format_version"] == "1"
    assert meta["functional_memopt.version"] == fm.__version__
    assert meta["functional_memopt.dtype"] == "bfloat16"
    assert load_params(tmp_path / "p.safetensors")[1] == cfg


def test_an_fp16_file_is_half_the_fp32_file_plus_a_header_under_one_percent(tmp_path):
    cfg = fm.ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=160)
    params = fm.init_params(cfg, seed=0)
    n = sum(x.numel() for x in fmtree.tree_flatten_with_paths(params).values())
    assert n >= 1_000_000
    sizes = {}
    for dtype in DTYPES:
        path = tmp_path / f"{dtype}.safetensors"
        save_params(path, params, cfg, dtype=dtype)
        sizes[dtype] = (os.path.getsize(path), header_bytes(path))
    (s16, h16), (sb16, hb16), (s32, h32) = sizes[torch.float16], sizes[torch.bfloat16], sizes[torch.float32]
    assert s16 - h16 == sb16 - hb16 == 2 * n
    assert s32 - h32 == 4 * n
    assert h16 < 0.01 * s16 and h32 < 0.01 * s32


def test_values_beyond_the_fp16_range_raise_naming_the_leaf_and_keep_the_old_file(tmp_path):
    path = tmp_path / "p.safetensors"
    params = fm.init_params(SMALL, seed=0)
    save_params(path, params, SMALL)
    old = path.read_bytes()
    params["h"][1]["mlp"]["c_fc"]["weight"] = params["h"][1]["mlp"]["c_fc"]["weight"].clone()
    params["h"][1]["mlp"]["c_fc"]["weight"][0, 0] = 65505.0  # rounds to 65504, still beyond the max
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*bfloat16"):
        save_params(path, params, SMALL)
    assert path.read_bytes() == old
    assert entries(tmp_path) == ["p.safetensors"]
    save_params(path, params, SMALL, dtype=torch.bfloat16)  # the suggested fix works
    assert load_params(path)[0]["h"][1]["mlp"]["c_fc"]["weight"][0, 0] == 65536.0


def test_a_value_that_overflows_bfloat16_is_refused_too(tmp_path):
    params = fm.init_params(SMALL, seed=0)
    params["wpe"] = params["wpe"].clone()
    params["wpe"][0, 0] = torch.finfo(torch.float32).max
    with pytest.raises(ValueError, match=r"'wpe'.*float32"):
        save_params(tmp_path / "p.safetensors", params, SMALL, dtype="bf16")
    assert entries(tmp_path) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_params_are_refused_naming_every_bad_leaf(tmp_path, bad):
    params = fm.init_params(SMALL, seed=0)
    params["ln_f"]["bias"] = torch.full_like(params["ln_f"]["bias"], bad)
    params["wte"] = params["wte"].clone()
    params["wte"][3, 1] = bad
    with pytest.raises(ValueError, match=r"\['ln_f\.bias', 'wte'\]|\['wte', 'ln_f\.bias'\]"):
        save_params(tmp_path / "p.safetensors", params, SMALL, dtype=torch.float32)
    assert entries(tmp_path) == []


def test_a_missing_output_folder_is_an_error_and_nothing_is_created(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        save_params(tmp_path / "no" / "such" / "p.safetensors", fm.init_params(SMALL), SMALL)
    assert entries(tmp_path) == []


def test_params_that_do_not_match_the_config_are_refused(tmp_path):
    params = fm.init_params(SMALL, seed=0)
    with pytest.raises(ValueError, match="save_params.*missing"):
        save_params(tmp_path / "p.safetensors", params, fm.ModelConfig(**{**SMALL.to_dict(), "n_layer": 3}))
    with pytest.raises(ValueError, match="save_params: dtype"):
        save_params(tmp_path / "p.safetensors", params, SMALL, dtype=torch.float64)
    assert entries(tmp_path) == []


def test_leaves_sharing_memory_are_saved_as_separate_tensors(tmp_path):
    params = fm.init_params(SMALL, seed=0)
    flat = fmtree.tree_flatten_with_paths(params)
    buffer = torch.cat([x.flatten() for x in flat.values()])  # every leaf a view into one buffer
    views, offset = {}, 0
    for k, x in flat.items():
        views[k] = buffer[offset: offset + x.numel()].view(x.shape)
        offset += x.numel()
    shared = fmtree.tree_unflatten_from_paths(views, params)
    save_params(tmp_path / "p.safetensors", shared, SMALL, dtype=torch.float32)
    testing.assert_trees_equal(load_params(tmp_path / "p.safetensors")[0], params)


def test_loading_onto_a_dtype_and_device_is_honoured(tmp_path):
    params = fm.init_params(SMALL, seed=0)
    save_params(tmp_path / "p.safetensors", params, SMALL, dtype=torch.float32)
    loaded, _ = load_params(tmp_path / "p.safetensors", dtype="bf16", device="cpu")
    testing.assert_trees_equal(loaded, fmtree.tree_cast(params, torch.bfloat16))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "header bytes flipped"])
def test_a_damaged_file_is_reported_as_not_a_valid_safetensors_file(tmp_path, damage):
    good = tmp_path / "good.safetensors"
    save_params(good, fm.init_params(SMALL, seed=0), SMALL)
    data = good.read_bytes()
    bad_bytes = {
        "truncated": data[: len(data) // 2],
        "random bytes": os.urandom(len(data)),
        "empty": b"",
        "header bytes flipped": data[:8] + bytes(b ^ 0xFF for b in data[8:40]) + data[40:],
    }[damage]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bad_bytes)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*not a valid safetensors file"):
        load_params(bad)


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_params"):
        load_params(tmp_path / "nope.safetensors")


def rewrite(path, tensors=None, **meta_changes):
    """Rewrite a params file with changed tensors or metadata (None deletes a metadata key).

    The rewritten file has no sha256 seal, like a file edited by hand: its contents are checked.
    """
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop(DIGEST_KEY)
    flat = tensors(flat) if tensors else flat
    for k, v in meta_changes.items():
        key = "functional_memopt." + k
        meta.pop(key) if v is None else meta.__setitem__(key, v)
    save_file(flat, str(path), metadata=meta)


def test_a_file_whose_tensors_do_not_match_its_config_lists_the_mismatches(tmp_path):
    path = tmp_path / "p.safetensors"
    save_params(path, fm.init_params(SMALL, seed=0), SMALL)
    rewrite(path, config=json.dumps({**SMALL.to_dict(), "n_layer": 3, "n_embd": 10}))
    with pytest.raises(ValueError, match=r"missing keys \['h\.2\.ln_1\.weight'.*wrong shapes \[wte: expected \(32, 10\)"):
        load_params(path)
    save_params(path, fm.init_params(SMALL, seed=0), SMALL)
    rewrite(path, lambda flat: {**flat, "lm_head.weight": flat["wte"].clone()})
    with pytest.raises(ValueError, match=r"unexpected keys \['lm_head\.weight'\]"):
        load_params(path)


def test_a_file_without_params_metadata_or_from_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a params file.*load_gpt2"):
        load_params(path)
    save_params(path, fm.init_params(SMALL, seed=0), SMALL)
    rewrite(path, format_version="99")
    with pytest.raises(ValueError, match="format version '99'"):
        load_params(path)
    save_params(path, fm.init_params(SMALL, seed=0), SMALL)
    rewrite(path, config="{not json")
    with pytest.raises(ValueError, match="no usable config"):
        load_params(path)


def test_non_finite_values_in_a_loaded_file_are_named(tmp_path):
    path = tmp_path / "p.safetensors"
    save_params(path, fm.init_params(SMALL, seed=0), SMALL)
    rewrite(path, lambda flat: {**flat, "h.0.ln_2.bias": torch.full_like(flat["h.0.ln_2.bias"], float("nan"))})
    with pytest.raises(ValueError, match=r"inf or nan values in \['h\.0\.ln_2\.bias'\]"):
        load_params(path)


def test_atomic_write_removes_its_temporary_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert entries(tmp_path) == ["f.bin"]
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new"
    assert entries(tmp_path) == ["f.bin"]


CHILD = textwrap.dedent(
    """
    import os, sys, time
    import functional_memopt as fm
    from functional_memopt.io import files as _files
    from functional_memopt.io.params import save_params

    def stall(fd):  # the temp file is complete, the rename has not happened: die here
        print("ready", flush=True)
        time.sleep(600)

    cfg = fm.ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    params = {k: v for k, v in fm.init_params(cfg, seed=1).items()}
    params["wte"] = params["wte"] * 2.0
    _files.os.fsync = stall
    save_params(sys.argv[1], params, cfg)
    """
)


def test_a_save_killed_before_it_completes_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "p.safetensors"
    cfg = fm.ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    params = fm.init_params(cfg, seed=0)
    save_params(path, params, cfg)
    old = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        temps = [e for e in entries(tmp_path) if e != "p.safetensors"]
        assert len(temps) == 1 and temps[0].startswith(".p.safetensors.") and temps[0].endswith(".tmp")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == old
    loaded, loaded_cfg = load_params(path)
    testing.assert_trees_equal(loaded, fmtree.tree_map(lambda x: x.half().float(), params))
    # The killed process cannot clean up; its temp file is recognisable and never read.
    assert all(e == "p.safetensors" or e.startswith(".p.safetensors.") for e in entries(tmp_path))


def test_a_saved_file_gets_the_permissions_of_an_ordinary_file_or_keeps_the_old_ones(tmp_path):
    params = fm.init_params(SMALL, seed=0)
    old_mask = os.umask(0o027)
    try:
        save_params(tmp_path / "new.safetensors", params, SMALL)
    finally:
        os.umask(old_mask)
    assert os.stat(tmp_path / "new.safetensors").st_mode & 0o777 == 0o640  # not mkstemp's 0o600
    os.chmod(tmp_path / "new.safetensors", 0o604)
    save_params(tmp_path / "new.safetensors", params, SMALL)
    assert os.stat(tmp_path / "new.safetensors").st_mode & 0o777 == 0o604


def test_identical_params_give_identical_bytes_with_sorted_metadata_and_the_step_recorded(tmp_path):
    # safetensors writes metadata in hash-map order, which changes from one call to the next.
    params = fm.init_params(SMALL, seed=0)
    blobs = set()
    for i in range(6):
        save_params(tmp_path / f"p{i}.safetensors", params, SMALL, step=12)
        blobs.add((tmp_path / f"p{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    raw = blobs.pop()
    header = json.loads(raw[8:header_bytes(tmp_path / "p0.safetensors")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert params_file_info(tmp_path / "p0.safetensors")["step"] == 12
    assert params_file_info(tmp_path / "p0.safetensors")["dtype"] == "float16"


@given(st.data())
def test_a_flipped_bit_anywhere_in_a_sealed_params_file_is_refused_never_loaded(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.safetensors")
        save_params(path, fm.init_params(SMALL, seed=1), SMALL)
        raw = bytearray(open(path, "rb").read())
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
        open(path, "wb").write(bytes(raw))
        with pytest.raises(ValueError, match=r"p\.safetensors' (is damaged|is not a valid safetensors file)"):
            load_params(path)


def test_a_full_disk_names_the_file_the_space_needed_and_free_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"the disk is full: writing 'f.bin' needs 2.0 MiB, and .* are free in .*"
                                      r"the existing 'f.bin' is intact") as err:
        atomic_write(target, full, caller="demo", size_hint=2 * 2**20)
    assert err.value.errno == errno.ENOSPC and str(err.value).startswith("demo: the disk is full")
    assert target.read_bytes() == b"old" and entries(tmp_path) == ["f.bin"]
    # safetensors reports a full disk as a SafetensorError carrying the OS error's text
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(SafetensorError("Error while serializing: invalid dtype"))


def test_leftovers_are_only_the_temporary_files_of_named_targets(tmp_path):
    names = [".p.safetensors.abc123de.tmp", ".p.safetensors.tmp", ".q.json.abc123de.tmp", "p.safetensors.abc123de.tmp",
             ".p.safetensors.abc123de.tmp.bak"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert leftovers(tmp_path, ["p.safetensors"]) == [".p.safetensors.abc123de.tmp"]
    assert leftovers(tmp_path, ["p.safetensors", "q.json"]) == [".p.safetensors.abc123de.tmp", ".q.json.abc123de.tmp"]


def test_a_flipped_bit_in_the_seal_keys_own_name_is_refused_not_read_as_an_unsealed_file(tmp_path):
    # "functional_memopt.sha256" -> "gunctional_memopt.sha256": the file would look unsealed (as
    # Hugging Face's files and earlier versions' are) and be read unverified.
    path = tmp_path / "p.safetensors"
    save_params(path, fm.init_params(SMALL, seed=1), SMALL)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"functional_memopt.sha256"') + 1
    raw[at] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"p\.safetensors' is damaged"):
        load_params(path)
