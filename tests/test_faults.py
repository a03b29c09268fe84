"""The fault-injection suite: kills at every write phase, bit flips in every file kind, a full disk,
SIGTERM and SIGINT, and damaged inputs. Each case ends resumed bit for bit, or refused with its
message and nothing overwritten.

Faults enter through hooks the project owns: ``io.files.add_write_hook`` (in-process: a copy of the
run directory taken at a write phase is exactly what a kill at that instant leaves on disk) and
``FUNCTIONAL_MEMOPT_FAULT`` (a real SIGKILL, or ENOSPC, in the ``memopt`` process).
"""

import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import functional_memopt as fm
from functional_memopt.app.cli import main
from functional_memopt.app.faults import WRITE_PHASES, install_fault_hook
from functional_memopt.io.checkpoint import STATE_JSON, checkpoint_info
from functional_memopt.io.files import JSON_SEAL, add_write_hook, machine_memory
from functional_memopt.memory.rss import rss_now

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
        "--threads", "1", "--quiet"]
SIX = ["--steps", "6", "--eval-interval", "3"]  # checkpoints at steps 0, 3 and 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FUNCTIONAL_MEMOPT_FAULT": ""}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def restore_threads_and_hooks(monkeypatch):
    monkeypatch.delenv("FUNCTIONAL_MEMOPT_FAULT", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    install_fault_hook(None)  # a hook main installed from the environment ends with the test


def train(run_dir, *extra):
    return main(["train", *TINY, "--run-dir", str(run_dir), *extra])


def resume(run_dir, *extra):
    return main(["train", "--resume", str(run_dir), "--quiet", *extra])


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def tensors(run_dir):
    return load_file(os.path.join(run_dir, checkpoint_info(run_dir)["tensors"]))


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def assert_same_run(run_dir, straight):
    """The run in ``run_dir`` ended exactly as the unbroken one: tensors, params bytes, metrics, no leftovers."""
    got, want = tensors(run_dir), tensors(straight)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert (run_dir / "params.safetensors").read_bytes() == (straight / "params.safetensors").read_bytes()
    a, b = rows(run_dir), rows(straight)
    assert [(r["kind"], r["step"], r.get("loss"), r.get("val_bpb")) for r in a] == \
        [(r["kind"], r["step"], r.get("loss"), r.get("val_bpb")) for r in b]
    assert not [e for e in os.listdir(run_dir) if e.endswith(".tmp")]
    assert main(["verify", str(run_dir)]) == 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The unbroken 6-step run every interrupted one must equal."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    before = torch.get_num_threads()
    assert train(folder, *SIX) == 0
    torch.set_num_threads(before)
    return folder


def test_every_fault_phase_is_reached_and_a_kill_at_any_of_them_then_resume_gives_the_unbroken_run(
        tmp_path, straight, capsys):
    run, snaps = tmp_path / "run", []

    def kill_here(phase, path):  # the disk as a SIGKILL at this instant would leave it
        copy = tmp_path / f"killed-{len(snaps):02d}"
        shutil.copytree(run, copy)
        snaps.append((phase, copy))

    remove = add_write_hook(kill_here)
    try:
        assert train(run, *SIX) == 0
    finally:
        remove()
    assert {phase for phase, _ in snaps} == set(WRITE_PHASES)
    assert len(snaps) == 4 + 3 * 13  # config.json once, then three checkpoints of 13 phases each
    for phase, copy in snaps:
        capsys.readouterr()
        if not (copy / "config.json").exists():  # killed while the run directory was being made
            before = snapshot(copy)
            assert resume(copy) == 2 and "not a memopt run directory" in capsys.readouterr().err
            assert snapshot(copy) == before
            assert train(copy, *SIX) == 0, phase  # only leftovers there: a plain rerun starts it
        elif not (copy / STATE_JSON).exists():  # killed before the first checkpoint committed
            before = snapshot(copy)
            assert resume(copy) == 2 and "start it again with --force" in capsys.readouterr().err
            assert snapshot(copy) == before
            assert train(copy, *SIX, "--force") == 0, phase
        else:
            assert resume(copy) == 0, phase
        assert_same_run(copy, straight)


def test_a_real_kill_while_the_final_params_are_written_is_found_and_repaired(tmp_path, straight, capsys):
    # The case: SIGKILL just after the last checkpoint committed, while params.safetensors is written.
    run = tmp_path / "run"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "FUNCTIONAL_MEMOPT_FAULT": "params.safetensors:written@3"}
    proc = subprocess.run([sys.executable, "-m", "functional_memopt", "train", *TINY, *SIX, "--run-dir", str(run)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint_info(run)["step"] == 6 and any(e.startswith(".params.safetensors.") for e in os.listdir(run))
    assert main(["verify", str(run)]) == 1
    assert "params.safetensors: holds step 3, but the checkpoint holds step 6" in capsys.readouterr().out
    assert main(["sample", str(run), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert "holds step 3, older than the newest checkpoint (step 6); reading the checkpoint instead" in out.err
    assert main(["convert", str(run), str(tmp_path / "newest.safetensors")]) == 0
    assert "reading the checkpoint instead" in capsys.readouterr().err
    assert fm.load_params(tmp_path / "newest.safetensors")[0]["wte"].equal(
        fm.load_params(straight / "params.safetensors")[0]["wte"])  # the newest params, not the stale file's
    assert resume(run) == 0
    out = capsys.readouterr()
    assert "held step 3, older than the checkpoint (step 6): rewrote it" in out.err
    assert "already complete at step 6/6" in out.out and "--steps 12" in out.out
    assert_same_run(run, straight)


@pytest.mark.parametrize("phase, what", [("checkpoint:written@2=enospc", "the previous checkpoint (step 0) is intact"),
                                         ("state.json:begin@2=enospc", "the previous checkpoint (step 0) is intact"),
                                         ("params.safetensors:begin@2=enospc", "The checkpoint of step 3 was saved")])
def test_a_full_disk_says_what_the_save_needed_and_what_is_intact_then_the_run_resumes(
        tmp_path, straight, capsys, monkeypatch, phase, what):
    monkeypatch.setenv("FUNCTIONAL_MEMOPT_FAULT", phase)
    run = tmp_path / "run"
    assert train(run, *SIX) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memopt: error: ") and "\n" not in err, err
    assert "the disk is full: writing" in err and " needs " in err and " are free in " in err, err
    assert what in err and f"memopt train --resume {run}" in err, err
    assert not [e for e in os.listdir(run) if e.endswith(".tmp")]  # the failed write cleaned up
    monkeypatch.delenv("FUNCTIONAL_MEMOPT_FAULT")
    assert resume(run) == 0
    assert_same_run(run, straight)


@pytest.fixture(scope="module")
def straight_12(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight12") / "run"
    before = torch.get_num_threads()
    assert train(folder, "--steps", "12", "--eval-interval", "4") == 0
    torch.set_num_threads(before)
    return folder


@pytest.mark.parametrize("sig, code, by", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_sigint_at_a_random_step_checkpoint_and_the_resume_equals_the_unbroken_run(
        tmp_path, straight_12, sig, code, by):
    at = random.Random(sig).randint(1, 9)  # the step to signal after (fixed per signal, so a failure replays)
    run = tmp_path / "run"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "functional_memopt", "train", *TINY, "--steps", "12",
                             "--eval-interval", "4", "--run-dir", str(run)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and sum('"train"' in line for line in
                                                        open(run / "metrics.jsonl")) >= at:
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:  # the run finished before the signal came: nothing to test but the result
        assert_same_run(run, straight_12)
        return
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"memopt: interrupted at step" in err and f"by {by}" in err
    stopped = checkpoint_info(run)["meta"]["batch_index"]
    assert stopped >= at and stopped == sum(r["kind"] == "train" for r in rows(run))
    assert resume(run) == 0
    assert_same_run(run, straight_12)


# ----------------------------------------------------------------------------- bit flips


def flip_bits(path, positions):
    data = bytearray(path.read_bytes())
    for byte, bit in positions:
        data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def data_offset(path, key):
    """Where the bytes of tensor ``key`` start in a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return 8 + n + header[key]["data_offsets"][0], header[key]["data_offsets"][1] - header[key]["data_offsets"][0]


def copy_of(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    return run


def tensor_file(run):
    return run / checkpoint_info(run)["tensors"]


FLIPS = {
    # the cases: the low bit of 1,000 params floats; 64 bytes of Adam's second moment
    "1000 low bits of the checkpoint's params": (
        tensor_file, lambda p: [(data_offset(p, "params.wte")[0] + 4 * i, 0) for i in range(1000)]),
    "64 bytes of the checkpoint's second moment": (
        tensor_file, lambda p: [(data_offset(p, "opt_state.nu.wpe")[0] + i, b) for i in range(64) for b in (6, 7)]),
    "one bit of the checkpoint's header": (tensor_file, lambda p: [(20, 0)]),
    "one bit of state.json": (lambda r: r / STATE_JSON, lambda p: [(p.read_bytes().index(b'"batch_index": 6') + 15, 0)]),
    "one bit of config.json": (lambda r: r / "config.json", lambda p: [(p.read_bytes().index(b'"lr": 0.002') + 10, 0)]),
}


@pytest.mark.parametrize("case", sorted(FLIPS))
def test_a_flipped_bit_in_a_checkpoint_or_a_record_is_refused_naming_the_file_and_nothing_is_overwritten(
        tmp_path, straight, capsys, case):
    run = copy_of(straight, tmp_path)
    which, where = FLIPS[case]
    path = which(run)
    flip_bits(path, where(path))
    before = snapshot(run)
    capsys.readouterr()
    assert resume(run, "--steps", "9") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memopt: error: ") and "\n" not in err and "Traceback" not in err, err
    assert any(f"{path.name}' {what}" in err for what in ("is damaged", "is not valid JSON",
                                                           "is not a valid safetensors file")), err
    if path.name.startswith("state-"):
        assert "the checkpoint at step 6" in err
    assert snapshot(run) == before  # refused before anything was written
    assert main(["verify", str(run)]) == 1
    assert f"DAMAGED  {path.name}" in capsys.readouterr().out


def test_a_flipped_bit_in_params_safetensors_is_reported_by_sample_and_verify_and_repaired_by_resume(
        tmp_path, straight, capsys):
    run = copy_of(straight, tmp_path)
    offset, size = data_offset(run / "params.safetensors", "h.0.mlp.c_fc.weight")
    flip_bits(run / "params.safetensors", [(offset + size // 2, 3)])
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    assert "DAMAGED  params.safetensors: " in capsys.readouterr().out
    assert main(["sample", str(run / "params.safetensors")]) == 2
    assert "params.safetensors' is damaged" in capsys.readouterr().err
    assert main(["sample", str(run), "--max-new-tokens", "3"]) == 0
    assert "reading the checkpoint instead" in capsys.readouterr().err
    assert resume(run) == 0
    assert "params.safetensors was damaged" in capsys.readouterr().err
    assert_same_run(run, straight)


def test_a_flipped_bit_in_metrics_jsonl_that_still_parses_is_reported_by_verify_and_resume(tmp_path, straight,
                                                                                          capsys):
    # A digit of a logged loss changed (still valid JSON, steps intact): the checkpoint's sha256 of
    # the log tells. Resume says so and goes on (the state does not depend on the log); verify fails.
    run = copy_of(straight, tmp_path)
    data = (run / "metrics.jsonl").read_bytes()
    at = data.index(b'"loss": ') + len(b'"loss": ') + 3  # a digit after "d.d"
    assert data[at:at + 1].isdigit()
    flip_bits(run / "metrics.jsonl", [(at, 0)])
    assert (run / "metrics.jsonl").read_bytes()[at:at + 1].isdigit() and len(rows(run)) == len(rows(straight))
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    assert "DAMAGED  metrics.jsonl: its rows up to the checkpoint do not match the sha256" in capsys.readouterr().out
    assert resume(run, "--steps", "7") == 0
    assert "metrics.jsonl in" in (err := capsys.readouterr().err) and "does not match the checksum" in err, err


def test_a_checkpoint_whose_damage_kept_its_checksum_is_refused_by_the_state_invariants(tmp_path, straight, capsys):
    # Negative, finite second moments (as the 64 damaged bytes) in a checkpoint with no checksum
    # (an earlier version wrote it): the values themselves are refused, before any step runs.
    run = copy_of(straight, tmp_path)
    record = json.loads((run / STATE_JSON).read_text())
    path = run / record["tensors"]
    flat = load_file(path)
    flat["opt_state.nu.wpe"][0, :16] = -3e30
    save_file(flat, str(path), metadata={"functional_memopt.checkpoint_id": record["id"]})
    del record["sha256"], record[JSON_SEAL]
    (run / STATE_JSON).write_text(json.dumps(record))
    before = snapshot(run)
    capsys.readouterr()
    assert resume(run, "--steps", "9") == 2
    err = capsys.readouterr().err
    assert "breaks the invariants of a training state: AdamW's second moments hold negative values" in err
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- damaged records


def unsealed(path, change):
    record = json.loads(path.read_text())
    record.pop(JSON_SEAL)
    change(record)
    path.write_text(json.dumps(record))


DAMAGED_RECORDS = {
    "accum_steps 0": ("config.json", lambda r: r["resolved"].update(accum_steps=0),
                      "resolved.accum_steps is 0, expected an integer >= 1"),
    "train.accum_steps 0": ("config.json", lambda r: r["train"].update(accum_steps=0),
                            "train.accum_steps is 0, expected an integer >= 1 or null"),
    "remat 5": ("config.json", lambda r: r["train"].update(remat=5), "train.remat is 5, expected a string"),
    "batch_size 'abc'": ("config.json", lambda r: r["train"].update(batch_size="abc"),
                         "train.batch_size is 'abc', expected an integer >= 1"),
    "lr nan": ("config.json", lambda r: r["train"].update(lr=float("nan")), "train.lr is nan, expected a number >= 0"),
    "a huge model": ("config.json", lambda r: r["model"].update(n_embd=2**20, n_head=1),
                     "more than this machine's"),
    "no meta.batch_index": ("state.json", lambda r: r["meta"].pop("batch_index"),
                            "meta.batch_index is missing, expected an integer >= 0"),
    "batch_index off by one": ("state.json", lambda r: r["meta"].update(batch_index=7),
                               "meta.batch_index is 7, expected the updates applied plus the steps skipped (6 + 0)"),
    "loss_chunk 0": ("config.json", lambda r: r["resolved"].update(loss_chunk=0),
                     'resolved.loss_chunk is 0, expected an integer >= 1 or "cce" or null'),
    "loss_chunk 'big'": ("config.json", lambda r: r["resolved"].update(loss_chunk="big"),
                         'resolved.loss_chunk is \'big\', expected an integer >= 1 or "cce" or null'),
    "cut-cross-entropy recorded, resumed on the CPU": (
        "config.json", lambda r: (r["train"].update(loss_chunk="cce"), r["resolved"].update(loss_chunk="cce")),
        "--loss-chunk cce runs cut-cross-entropy's CUDA kernels; this run is on cpu"),
    "step -1": ("state.json", lambda r: r.update(step=-1), "the field 'step' is -1, expected an integer >= 0"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_RECORDS))
def test_a_damaged_record_field_is_named_in_one_line_and_nothing_is_written(tmp_path, straight, capsys, case):
    name, change, expected = DAMAGED_RECORDS[case]
    run = copy_of(straight, tmp_path)
    unsealed(run / name, change)
    before = snapshot(run)
    capsys.readouterr()
    assert resume(run, "--steps", "9") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memopt: error: ") and "\n" not in err and expected in err, err
    assert snapshot(run) == before


def test_an_edited_sealed_record_is_refused_as_damaged(tmp_path, straight, capsys):
    run = copy_of(straight, tmp_path)
    text = (run / "config.json").read_text().replace('"accum_steps": 4', '"accum_steps": 0')
    (run / "config.json").write_text(text)
    assert resume(run) == 2
    assert "config.json' is damaged: its contents do not match the sha256" in capsys.readouterr().err


def test_a_run_written_before_checksums_still_resumes(tmp_path, straight, capsys):
    run = copy_of(straight, tmp_path)
    for name in ("config.json", STATE_JSON):
        unsealed(run / name, lambda r: r.pop("sha256", None))
    assert resume(run, "--steps", "9") == 0
    assert "has no checksum (an earlier version wrote it)" in capsys.readouterr().err


def test_only_the_temporary_files_the_project_names_are_removed(tmp_path, straight, capsys):
    run = copy_of(straight, tmp_path)
    ours = [".state.json.k2j4h5g6.tmp", ".params.safetensors.a_b1c2d3.tmp", ".config.json.zz99yy88.tmp",
            ".state-000000003-0123456789abcdef.safetensors.qwertyui.tmp"]
    theirs = [".notes.txt.abcdefgh.tmp", ".state.json.tmp", "state.json.abcdefgh.tmp", ".mine"]
    for name in ours + theirs:
        (run / name).write_text("x")
    assert resume(run, "--steps", "7") == 0
    left = set(os.listdir(run))
    assert not left & set(ours) and set(theirs) <= left
    assert "removed 4 temporary file(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- untrusted files


def test_a_sparse_file_declaring_more_than_the_machines_memory_is_refused_before_reading(tmp_path):
    total = machine_memory()
    cfg = fm.ModelConfig(vocab_size=max(256, total // (4 * 4096) + 1), block_size=8, n_layer=1, n_head=1,
                         n_embd=4096)
    shapes = fm.param_shapes(cfg)
    header, offset = {"__metadata__": {"functional_memopt.format": "functional_memopt.params",
                                       "functional_memopt.format_version": "1",
                                       "functional_memopt.config": json.dumps(cfg.to_dict())}}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: a few KiB on disk
    assert os.stat(path).st_blocks * 512 < 1 << 20
    before = rss_now()
    with pytest.raises(ValueError, match=r"declares tensors of .* GiB, more than this machine's .* of memory"):
        fm.load_params(path)
    assert rss_now() - before < 64 << 20


def hf_dir(tmp_path, index):
    cfg = fm.ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=8)
    d = tmp_path / "hf"
    fm.save_gpt2(d, fm.init_params(cfg), cfg)
    os.rename(d / "model.safetensors", d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_a_hugging_face_index_cannot_lead_outside_its_directory_or_lack_its_weight_map(tmp_path, capsys):
    (tmp_path / "elsewhere.safetensors").write_bytes(b"not read")
    d = hf_dir(tmp_path, {"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}})
    with pytest.raises(ValueError, match=r"names the shard '../elsewhere.safetensors', which is not a .safetensors file "
                                         r"inside that directory"):
        fm.load_gpt2(d)
    os.symlink(tmp_path / "elsewhere.safetensors", d / "link.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte": "link.safetensors"}}))
    with pytest.raises(ValueError, match="'link.safetensors', which is not a .safetensors file inside"):
        fm.load_gpt2(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert main(["sample", str(d), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memopt: error: load_gpt2: model.safetensors.index.json") and "has no weight_map" in err
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in ("a", "b")}}))
    assert fm.load_gpt2(d)[1].n_layer == 1  # a sound index still loads


@pytest.mark.parametrize("argv, expected", [
    (["--temperature", "1e-40"], "sample: --temperature 1e-40 is below 0.001"),
    (["--temperature", "inf"], "sample: --temperature must be a finite number >= 0"),
    (["--top-k", "300"], "sample: --top-k 300 exceeds the model's vocabulary of 256 tokens"),
])
def test_degenerate_sampling_arguments_get_one_line(tmp_path, straight, capsys, argv, expected):
    assert main(["sample", str(straight), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memopt: error: ") and "\n" not in err and expected in err, err


# ----------------------------------------------------------------------------- the run's own semantics


def test_a_refused_flag_value_creates_no_run_directory(tmp_path, capsys):
    for flag, value in (("--max-grad-norm", "nan"), ("--lr", "inf"), ("--beta2", "1.0"), ("--min-lr", "-1")):
        assert train(tmp_path / "run", flag, value) == 2
        assert flag in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, straight, capsys):
    run = copy_of(straight, tmp_path)
    before = snapshot(run)
    capsys.readouterr()
    assert resume(run) == 0
    out = capsys.readouterr().out
    assert f"memopt: the run in {run} is already complete at step 6/6" in out and "--steps 12" in out
    assert snapshot(run) == before


def test_a_longer_steps_is_said_recorded_and_reproducible(tmp_path, straight, capsys):
    # 6 steps, then --steps 9 in two sessions (killed once between) equals 6 then --steps 9 in one.
    one, two = copy_of(straight, tmp_path / "a"), copy_of(straight, tmp_path / "b")
    capsys.readouterr()
    assert resume(one, "--steps", "9") == 0
    err = capsys.readouterr().err
    assert "--steps 9 (was 6): the cosine schedule now spans 9 steps instead of 6" in err and "config.json" in err
    config = json.loads((one / "config.json").read_text())
    assert config["train"]["steps"] == 9
    assert config["steps_history"] == [{"at_step": 6, "steps_before": 6, "steps_after": 9}]
    assert resume(two, "--steps", "9", "--stop-at", "7") == 0
    assert resume(two) == 0  # config.json now says 9: the same schedule without repeating --steps
    got, want = tensors(two), tensors(one)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (two / "params.safetensors").read_bytes() == (one / "params.safetensors").read_bytes()
    train_rows = lambda run: [(r["step"], r["loss"]) for r in rows(run) if r["kind"] == "train"]  # noqa: E731
    assert train_rows(two) == train_rows(one)  # (--stop-at adds an evaluation at step 7: that row differs)
    assert [r["step"] for r in rows(one) if r["kind"] == "train"] == list(range(1, 10))


def test_two_identical_runs_write_byte_identical_params_files(tmp_path, straight):
    assert train(tmp_path / "again", *SIX) == 0
    assert (tmp_path / "again/params.safetensors").read_bytes() == (straight / "params.safetensors").read_bytes()


def test_an_update_that_is_never_finite_is_skipped_then_stops_the_run_keeping_the_last_checkpoint(tmp_path, capsys):
    # The step donates its state, so the non-finite update overwrote it: the loop rebuilds the state
    # from the checkpoint, runs the step undonated, which skips the update; fp32 has no loss scale to
    # lower, so the run then stops.
    run = tmp_path / "run"
    code = train(run, "--steps", "4", "--policy", "fp32", "--lr", "1e39", "--warmup-steps", "0",
                 "--max-grad-norm", "0")
    assert code == 1
    err = capsys.readouterr().err
    assert "the update of step 1 (learning rate 1e+39) would have written inf or nan into params." in err, err
    assert "from finite gradients; skipped it (rebuilt from the checkpoint of step 0, 0 step(s) replayed)" in err
    assert "The last good checkpoint (step 0) is kept" in err
    last = rows(run)[-1]
    assert last["nonfinite_update"] is True and last["skipped"] is True and math.isfinite(last["grad_norm"])
    assert main(["verify", str(run)]) == 0


def test_a_transient_fault_that_makes_an_update_non_finite_loses_nothing(tmp_path, straight, capsys, monkeypatch):
    # A second moment of -1 in memory before step 5 (a memory fault): the donated update writes nan,
    # the loop rebuilds the state from the checkpoint of step 3, replays step 4, and runs step 5 again
    # undonated, now finite. The run ends bit for bit as the unbroken one.
    monkeypatch.setenv("FUNCTIONAL_MEMOPT_FAULT", "step:begin@5=poison")
    assert train(tmp_path / "run", *SIX) == 0
    err = capsys.readouterr().err
    assert ("update of step 5 (learning rate" in err and "run again, it was finite (a transient fault), so it was "
            "applied (rebuilt from the checkpoint of step 3, 1 step(s) replayed)" in err), err
    assert_same_run(tmp_path / "run", straight)
    assert not any(r.get("skipped") for r in rows(tmp_path / "run"))


def test_a_fault_spec_the_hook_cannot_read_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FUNCTIONAL_MEMOPT_FAULT", "params.safetensors:exploded")
    assert train(tmp_path / "run", *SIX) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memopt: error: FUNCTIONAL_MEMOPT_FAULT='params.safetensors:exploded' is not") and "\n" not in err
    assert not (tmp_path / "run").exists()
