import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import functional_memopt as fm
from functional_memopt import _tree as fmtree
from functional_memopt.io.checkpoint import checkpoint_info, load_checkpoint_params
from functional_memopt.io.gpt2 import save_gpt2
from functional_memopt.model.generate import generate
from functional_memopt.io.params import load_params, save_params
from functional_memopt.app.cli import main
from functional_memopt.testing import assert_trees_equal

# A model small enough that a handful of steps take well under a second.
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
        "--threads", "1", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def train(run_dir, *extra):
    return main(["train", *TINY, "--run-dir", str(run_dir), *extra])


def lines(path):
    return [json.loads(line) for line in open(path)]


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def checkpoint_tensors(run_dir):
    return load_file(os.path.join(run_dir, checkpoint_info(run_dir)["tensors"]))


def test_train_writes_config_metrics_params_and_a_checkpoint_and_learns(tmp_path, capsys):
    assert train(tmp_path / "run", "--steps", "6", "--eval-interval", "3") == 0
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "params.safetensors", "state.json"} <= set(os.listdir(run))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["train"]["steps"] == 6
    assert config["resolved"]["accum_steps"] == 4 and config["resolved"]["policy"] in ("fp32", "mixed_bf16")
    metrics = lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 3, 6]
    assert evals[0]["val_bpb"] == pytest.approx(evals[0]["val_loss"] / 0.6931471805599453)
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] < 8.5
    params, cfg = load_params(run / "params.safetensors")
    assert cfg.n_layer == 1 and cfg.block_size == 32
    masters, _ = load_checkpoint_params(run)
    assert_trees_equal(params, fmtree.tree_map(lambda x: x.half().float(), masters))
    assert checkpoint_info(run)["meta"]["batch_index"] == 6
    out = capsys.readouterr().out.strip()
    assert out.startswith("memopt: done at step 6/6") and "bits/byte" in out and "tokens/s" in out


@pytest.mark.parametrize("policy", ["fp32", "mixed_fp16"])
def test_k_steps_then_resume_equals_an_unbroken_run_bitwise(tmp_path, policy):
    # mixed_fp16 brings a dynamic loss scale whose state must survive the resume too.
    args = ["--steps", "7", "--eval-interval", "3", "--policy", policy]
    assert train(tmp_path / "straight", *args) == 0
    assert train(tmp_path / "parts", *args, "--stop-at", "4") == 0
    assert checkpoint_info(tmp_path / "parts")["meta"]["batch_index"] == 4
    assert main(["train", "--resume", str(tmp_path / "parts"), "--quiet"]) == 0
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "parts")
    assert sorted(a) == sorted(b) and int(a["step"]) == 7
    if policy == "mixed_fp16":
        assert "loss_scale.counter" in a
    assert_trees_equal(b, a)
    assert_trees_equal(load_file(tmp_path / "parts/params.safetensors"),
                       load_file(tmp_path / "straight/params.safetensors"))
    straight = [m for m in lines(tmp_path / "straight/metrics.jsonl") if m["kind"] == "train"]
    parts = [m for m in lines(tmp_path / "parts/metrics.jsonl") if m["kind"] == "train"]
    assert [m["loss"] for m in parts] == [m["loss"] for m in straight]


def test_a_corpus_file_trains_and_resumes_from_another_folder(tmp_path, monkeypatch):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    monkeypatch.chdir(tmp_path)
    assert train("run", "--corpus", "text.txt", "--steps", "3", "--stop-at", "2") == 0
    assert json.loads((tmp_path / "run/config.json").read_text())["train"]["corpus"] == str(tmp_path / "text.txt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert checkpoint_info(tmp_path / "run")["meta"]["batch_index"] == 3


def test_a_loss_that_turns_nan_in_fp32_stops_keeping_the_last_good_checkpoint(tmp_path, capsys):
    code = train(tmp_path / "run", "--steps", "20", "--policy", "fp32", "--lr", "1e30", "--warmup-steps", "0",
                 "--max-grad-norm", "0")
    assert code == 1
    err = capsys.readouterr().err
    assert "memopt: error: train: the loss became non-finite" in err and "checkpoint (step 0)" in err
    metrics = lines(tmp_path / "run/metrics.jsonl")
    assert metrics[-1]["skipped"] is True and metrics[-1]["loss"] == "nan"
    params, _ = load_checkpoint_params(tmp_path / "run")  # finite and loadable
    assert checkpoint_info(tmp_path / "run")["meta"]["batch_index"] == 0


def test_force_replaces_a_previous_run_but_never_a_folder_of_other_files(tmp_path, capsys):
    assert train(tmp_path / "run", "--steps", "2") == 0
    assert train(tmp_path / "run", "--steps", "3", "--force") == 0
    assert json.loads((tmp_path / "run/config.json").read_text())["train"]["steps"] == 3
    assert len([f for f in os.listdir(tmp_path / "run") if f.startswith("state-")]) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert train(other, "--steps", "2", "--force") == 2
    assert snapshot(other) == {"notes.txt": b"keep me"}
    assert "not a memopt run" in capsys.readouterr().err


def another_config_checkpoint(tmp_path):
    assert train(tmp_path / "a", "--steps", "2") == 0
    assert main(["train", *TINY, "--n-layer", "2", "--steps", "2", "--run-dir", str(tmp_path / "b")]) == 0
    for name in os.listdir(tmp_path / "a"):
        if name.startswith("state"):
            os.unlink(tmp_path / "a" / name)
    for name in os.listdir(tmp_path / "b"):
        if name.startswith("state"):
            shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    return ["train", "--resume", str(tmp_path / "a")]


def empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    return ["train", *TINY, "--corpus", str(tmp_path / "empty.txt"), "--run-dir", str(tmp_path / "run")]


def non_byte_model(tmp_path):
    cfg = fm.ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8)
    save_params(tmp_path / "p.safetensors", fm.init_params(cfg), cfg)
    return ["sample", str(tmp_path / "p.safetensors"), "--prompt", "hello"]


BAD_INPUT = {
    "unknown preset": (lambda t: ["train", "--preset", "huge", "--run-dir", str(t / "run")], "unknown preset 'huge'"),
    "missing corpus": (lambda t: ["train", *TINY, "--corpus", str(t / "no.txt"), "--run-dir", str(t / "run")],
                       "does not exist"),
    "empty corpus": (empty_corpus, "is empty"),
    "resume of a folder that is not a run": (lambda t: ["train", "--resume", str(t)], "not a memopt run directory"),
    "resume of a missing folder": (lambda t: ["train", "--resume", str(t / "nope")], "no run directory"),
    "checkpoint of another config": (another_config_checkpoint, "another model config"),
    "invalid precision": (lambda t: ["train", "--policy", "fp17", "--run-dir", str(t / "run")], "get_policy"),
    "accumulation that does not fit": (lambda t: ["train", "--batch-size", "6", "--accum-steps", "4",
                                                  "--run-dir", str(t / "run")], "does not divide --batch-size 6"),
    "not a number": (lambda t: ["train", "--steps", "many"], "argument --steps"),
    "cut-cross-entropy on the CPU": (lambda t: ["train", *TINY, "--loss-chunk", "cce", "--run-dir", str(t / "run")],
                                     "--loss-chunk cce runs cut-cross-entropy's CUDA kernels"),
    "a loss chunk that is not one": (lambda t: ["train", *TINY, "--loss-chunk", "big", "--run-dir", str(t / "run")],
                                     "--loss-chunk must be auto, none, an integer >= 1 (tokens per chunk) or cce"),
    "unknown command": (lambda t: ["fly"], "invalid choice"),
    "sequence longer than the block": (lambda t: ["train", *TINY, "--seq-len", "64", "--run-dir", str(t / "r")],
                                       "exceeds the block size"),
    "changing the lr on resume": (lambda t: (train(t / "r", "--steps", "2"), ["train", "--resume", str(t / "r"),
                                                                           "--lr", "1"])[1], "cannot change"),
    "sample of a missing file": (lambda t: ["sample", str(t / "missing.safetensors")], "no file or directory"),
    "text prompt for a non-byte model": (non_byte_model, "not bytes"),
    "a model beyond the machine's memory": (lambda t: ["train", "--n-embd", "1048576", "--n-head", "1",
                                                       "--run-dir", str(t / "run")], "more than this machine's"),
    "bad prompt ids": (lambda t: (save_params(t / "p.safetensors", fm.init_params(fm.ModelConfig(n_layer=1, n_embd=8,
                                  n_head=2)), fm.ModelConfig(n_layer=1, n_embd=8, n_head=2)),
                                  ["sample", str(t / "p.safetensors"), "--prompt-ids", "1,x"])[1], "comma-separated"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_ends_with_one_error_line_and_exit_code_2(tmp_path, capsys, case):
    make_argv, expected = BAD_INPUT[case]
    argv = make_argv(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memopt: error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing was created


def test_an_existing_run_directory_without_force_is_refused_and_left_untouched(tmp_path, capsys):
    assert train(tmp_path / "run", "--steps", "2") == 0
    before = snapshot(tmp_path / "run")
    assert train(tmp_path / "run", "--steps", "2") == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("module, argv", [("functional_memopt", ["train", "--preset", "huge"]),
                                          ("functional_memopt.app.cli", ["train", "--policy", "fp17"])])
def test_no_traceback_reaches_stderr_from_the_command(tmp_path, module, argv):
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("memopt: error: ")
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "functional_memopt", "train", *TINY, "--steps", "100000",
                             "--run-dir", str(run)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and '"train"' in (run / "metrics.jsonl").read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, 0)
    assert "Traceback" not in err and "memopt: interrupted at step" in err and "--resume" in err
    batch_index = checkpoint_info(run)["meta"]["batch_index"]
    assert batch_index >= 1
    assert batch_index == sum(m["kind"] == "train" for m in lines(run / "metrics.jsonl"))
    params, cfg = load_checkpoint_params(run)
    assert cfg.n_layer == 1


def test_torchrun_trains_on_two_cpu_ranks_and_one_process_resumes_the_run(tmp_path):
    # Two gloo ranks, ZeRO stage 1: rank 0 writes the run, whose checkpoint one plain process resumes.
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    args = [*TINY, "--corpus", str(tmp_path / "text.txt"), "--steps", "4", "--eval-interval", "2", "--policy", "fp32"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**ENV, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "functional_memopt.app.cli", "train", *args, "--zero-stage", "1", "--stop-at", "2",
                           "--run-dir", str(tmp_path / "dp")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("memopt: stopped at step 2/4") == 1 and "on 2 ranks (ZeRO stage 1)" in proc.stdout
    assert "Traceback" not in proc.stderr and "memopt: error" not in proc.stderr
    assert json.loads((tmp_path / "dp/config.json").read_text())["train"]["zero_stage"] == 1
    assert checkpoint_info(tmp_path / "dp")["meta"]["batch_index"] == 2
    assert main(["train", "--resume", str(tmp_path / "dp"), "--quiet"]) == 0
    assert checkpoint_info(tmp_path / "dp")["meta"]["batch_index"] == 4
    # The same run in one process from the start: the ranks' sums associate differently, so close, not equal.
    assert train(tmp_path / "one", *args[len(TINY):]) == 0
    split, one = lines(tmp_path / "dp/metrics.jsonl"), lines(tmp_path / "one/metrics.jsonl")
    assert [(m["kind"], m["step"]) for m in split] == [(m["kind"], m["step"]) for m in one]
    assert all(m["tokens"] == 8 * 32 for m in split if m["kind"] == "train")  # global tokens, not a rank's
    for key in ("loss", "val_bpb"):
        got, want = [m[key] for m in split if key in m], [m[key] for m in one if key in m]
        assert got == pytest.approx(want, rel=1e-5) and len(got) >= 3


def test_sample_is_seeded_and_reads_run_dirs_params_files_and_checkpoints(tmp_path, capsys):
    assert train(tmp_path / "run", "--steps", "2") == 0
    capsys.readouterr()
    argv = ["--prompt", "def ", "--max-new-tokens", "12", "--seed", "3", "--device", "cpu"]
    outputs = []
    for source in ("run", "run", "run/params.safetensors"):
        assert main(["sample", str(tmp_path / source), *argv]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].startswith("def ")
    os.unlink(tmp_path / "run/params.safetensors")  # the fp32 checkpoint alone is enough
    assert main(["sample", str(tmp_path / "run"), "--prompt", "x", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    params, cfg = load_checkpoint_params(tmp_path / "run")
    want = fm.decode(generate(params, cfg, fm.encode("x"), max_new_tokens=5, temperature=0))
    assert capsys.readouterr().out == want + "\n"


def test_sample_prints_token_ids_for_a_gpt2_vocabulary(tmp_path, capsys):
    cfg = fm.ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=8)
    params = fm.init_params(cfg, seed=1)
    save_gpt2(tmp_path / "gpt2", params, cfg)
    assert main(["sample", str(tmp_path / "gpt2"), "--prompt-ids", "464, 3290", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    assert ids == generate(params, cfg, [464, 3290], max_new_tokens=3, temperature=0).tolist()


def test_convert_round_trips_params_through_a_gpt2_directory_and_never_overwrites(tmp_path, capsys):
    cfg = fm.ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    params = fm.init_params(cfg, seed=2)
    save_params(tmp_path / "p.safetensors", params, cfg, dtype="fp32")
    assert main(["convert", str(tmp_path / "p.safetensors"), str(tmp_path / "hf"), "--to", "gpt2",
                 "--dtype", "fp32"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "half.safetensors"), "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("memopt: converted") and "fp32" in out[0] and "->" in out[1] and "KiB" in out[1]
    half, cfg2 = load_params(tmp_path / "half.safetensors", dtype=torch.float16)
    assert cfg2 == cfg
    assert_trees_equal(half, fmtree.tree_cast(params, torch.float16))
    assert os.path.getsize(tmp_path / "half.safetensors") < os.path.getsize(tmp_path / "p.safetensors")
    before = (tmp_path / "half.safetensors").read_bytes()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "half.safetensors"), "--dtype", "bf16"]) == 2
    assert (tmp_path / "half.safetensors").read_bytes() == before
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "half.safetensors"), "--dtype", "bf16",
                 "--force"]) == 0
    assert load_params(tmp_path / "half.safetensors", dtype="bf16")[0]["wte"].dtype == torch.bfloat16


def test_help_lists_every_command_and_train_help_every_preset(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in ("train", "sample", "convert", "memory", "verify"))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name} ({cfg.n_layer} layers, width {cfg.n_embd}" in text for name, cfg in fm.PRESETS.items())


def test_the_run_says_its_threads_and_why_and_labels_its_units(tmp_path, capsys):
    assert main(["train", *[a for a in TINY if a != "--quiet"], "--steps", "2", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert "memopt: 1 CPU thread(s) (--threads)" in out.err
    assert "step 2: validation loss" in out.err and "bits/byte" in out.err
    assert "loss " in out.err and " bits/byte | " in out.err and "| peak RSS " in out.err  # the bar
    assert "validation loss" in out.out and "bits/byte, peak RSS" in out.out and "on 1 CPU thread(s)" in out.out
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "3"]) == 0
    assert "1 CPU thread(s) (recorded in config.json, so a resume gives the same bits)" in capsys.readouterr().err


def test_verify_passes_a_sound_run_directory_and_refuses_a_folder_that_is_not_one(tmp_path, capsys):
    assert train(tmp_path / "run", "--steps", "2") == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("  ok ") == 5 and f"memopt: {tmp_path / 'run'} verified: 5 files ok" in out
    (tmp_path / "other").mkdir()
    assert main(["verify", str(tmp_path / "other")]) == 2
    assert "is not a memopt run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_configuration_trains_and_resumes(tmp_path):
    # The real defaults (tiny preset, batch 32 = 4 x 8, sequence 128), stopped after two steps.
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--stop-at", "2", "--quiet"]) == 0
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["model"] == fm.get_config("tiny").to_dict() and config["resolved"]["accum_steps"] == 4
    assert checkpoint_info(tmp_path / "run")["meta"]["batch_index"] == 2
    assert main(["train", "--resume", str(tmp_path / "run"), "--stop-at", "3", "--quiet"]) == 0
    assert checkpoint_info(tmp_path / "run")["meta"]["batch_index"] == 3
