"""A fault campaign on a tiny run: random kills at any moment and random bit flips, then resume.

Run (not in CI; about 15 minutes on 2 cores):
    python benchmarks/fault_campaign.py --kills 50 --flips 20 --out benchmarks/out/faults

Every trial drives the ``memopt`` command in subprocesses, as a user would:

- kill: a run is killed with SIGKILL, half of the time at a random write phase (through
  ``FUNCTIONAL_MEMOPT_FAULT=<phase>@<n>``), half at a random moment (the harness sends the signal);
  then it is resumed (or, when it died before its first checkpoint, started again) to the end.
- flip: one random bit of one random file of a finished run is flipped; then ``memopt verify`` runs
  and the run is resumed with a larger ``--steps``.

Outcomes counted:
- silent wrong result: a command succeeded but the final checkpoint or params.safetensors differs
  from an unbroken run's (bit for bit);
- lost checkpoint: after a kill, a checkpoint that had been committed no longer loads;
- refused: the command exited non-zero with one ``memopt: error:`` line and changed nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
        "--threads", "1", "--quiet"]
STEPS = ["--steps", "8", "--eval-interval", "2"]  # five checkpoints: steps 0, 2, 4, 6, 8
KINDS = ("checkpoint", "state.json", "params.safetensors", "config.json")
STAGES = ("begin", "written", "synced", "renamed")
PHASES = [f"{k}:{s}" for k in KINDS for s in STAGES] + ["checkpoint:committed"]
TIMES = {"config.json": 1}  # how often a run reaches each kind's phases (the others: once per checkpoint)


def memopt(*argv, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FUNCTIONAL_MEMOPT_FAULT": "",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "functional_memopt", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def result_of(run_dir: str) -> tuple[str, str] | None:
    """(sha256 of the checkpoint's tensor data by key, sha256 of params.safetensors), or None if unreadable."""
    import torch
    from safetensors.torch import load_file  # the library's own readers are not used to judge it

    try:
        with open(os.path.join(run_dir, "state.json")) as f:
            name = json.load(f)["tensors"]
        flat = load_file(os.path.join(run_dir, name))
        h = hashlib.sha256()
        for key in sorted(flat):
            h.update(key.encode() + flat[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest(), digest(os.path.join(run_dir, "params.safetensors"))
    except Exception:  # noqa: BLE001 - any failure means "no result"
        return None


def snapshot(run_dir: str) -> dict[str, str]:
    return {n: digest(os.path.join(run_dir, n)) for n in sorted(os.listdir(run_dir))
            if os.path.isfile(os.path.join(run_dir, n))}


def one_error_line(proc) -> bool:
    err = proc.stderr.strip()
    return err.startswith("memopt: error: ") and "\n" not in err and "Traceback" not in err


def kill_trial(rng: random.Random, work: str, straight: tuple[str, str], run_s: float) -> dict:
    run_dir = os.path.join(work, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["train", *TINY, *STEPS, "--run-dir", run_dir]
    trial = {"kind": "kill"}
    committed_before = False
    if rng.random() < 0.5:
        phase = rng.choice(PHASES)
        n = rng.randint(1, TIMES.get(phase.split(":")[0], 5))
        trial["at"] = f"{phase}@{n}"
        proc = memopt(*argv, env_extra={"FUNCTIONAL_MEMOPT_FAULT": trial["at"]})
        trial["killed"] = proc.returncode == -signal.SIGKILL
        # A checkpoint had committed when the kill came after the first rename of state.json: the n-th
        # checkpoint's phases come after n - 1 commits, and params.safetensors is written after its own.
        kind, stage = phase.split(":")
        committed_before = kind != "config.json" and (
            n >= 2 or kind == "params.safetensors" or phase in ("state.json:renamed", "checkpoint:committed"))
    else:  # a random moment of the run's own work: after config.json appears, before the run would end
        delay = rng.uniform(0.0, 0.9 * run_s)  # (run_s includes the process's exit)
        trial["at"] = f"{delay:.3f} s after config.json"
        p, _ = start(argv)
        wait_for(p, os.path.join(run_dir, "config.json"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < delay and p.poll() is None:
            time.sleep(0.002)
        committed_before = os.path.exists(os.path.join(run_dir, "state.json"))
        p.send_signal(signal.SIGKILL)
        p.wait()
        trial["killed"] = p.returncode == -signal.SIGKILL
    trial["lost_checkpoint"] = False
    if committed_before:  # the newest committed checkpoint must still load: state.json and its tensor file sound
        v = memopt("verify", run_dir)
        trial["lost_checkpoint"] = "DAMAGED  state" in v.stdout or not os.path.exists(os.path.join(run_dir, "state.json"))
    if not os.path.isdir(run_dir) or not os.path.exists(os.path.join(run_dir, "config.json")):
        proc, trial["then"] = memopt(*argv), "started again"
    elif not os.path.exists(os.path.join(run_dir, "state.json")):
        proc, trial["then"] = memopt(*argv, "--force"), "started again with --force"
    else:
        proc, trial["then"] = memopt("train", "--resume", run_dir, "--quiet"), "resumed"
    trial["exit"] = proc.returncode
    got = result_of(run_dir)
    trial["identical"] = got == straight
    trial["silent_wrong"] = proc.returncode == 0 and got != straight
    return trial


def start(argv) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FUNCTIONAL_MEMOPT_FAULT": "",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "functional_memopt", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), time.monotonic()


def wait_for(p: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)


def flip_trial(rng: random.Random, work: str, finished: str, straight_10: tuple[str, str]) -> dict:
    run_dir = os.path.join(work, "flip")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(finished, run_dir)
    files = sorted(n for n in os.listdir(run_dir) if not n.startswith("."))
    name = rng.choice(files)
    path = os.path.join(run_dir, name)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        at, bit = rng.randrange(len(data)), rng.randrange(8)
        data[at] ^= 1 << bit
        f.seek(0)
        f.write(data)
    kind = "checkpoint" if name.startswith("state-") else name
    trial = {"kind": "flip", "file": kind, "at": f"byte {at} bit {bit} of {len(data)}"}
    trial["verify_exit"] = memopt("verify", run_dir).returncode
    before = snapshot(run_dir)
    proc = memopt("train", "--resume", run_dir, "--quiet", "--steps", "10")
    trial["exit"] = proc.returncode
    if proc.returncode == 0:
        got = result_of(run_dir)
        trial["identical"] = got == straight_10
        trial["silent_wrong"] = got != straight_10
        trial["outcome"] = "resumed"
    else:
        trial["silent_wrong"] = False
        trial["outcome"] = "refused" if one_error_line(proc) and snapshot(run_dir) == before else "refused untidily"
        trial["message"] = proc.stderr.strip()[:200]
    return trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "out", "faults"), help="work folder and report")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.monotonic()
    straight_dir = os.path.join(args.out, "straight")
    shutil.rmtree(straight_dir, ignore_errors=True)
    p, _ = start(["train", *TINY, *STEPS, "--run-dir", straight_dir])
    wait_for(p, os.path.join(straight_dir, "config.json"))
    t_config = time.monotonic()
    assert p.wait() == 0
    run_s = time.monotonic() - t_config  # how long the run works once its directory exists
    straight = result_of(straight_dir)
    straight_10_dir = os.path.join(args.out, "straight10")
    shutil.rmtree(straight_10_dir, ignore_errors=True)
    shutil.copytree(straight_dir, straight_10_dir)
    assert memopt("train", "--resume", straight_10_dir, "--quiet", "--steps", "10").returncode == 0
    straight_10 = result_of(straight_10_dir)
    trials = []
    for i in range(args.kills):
        trials.append(kill_trial(rng, args.out, straight, run_s))
        print(f"kill {i + 1}/{args.kills}: {trials[-1]}", flush=True)
    for i in range(args.flips):
        trials.append(flip_trial(rng, args.out, straight_dir, straight_10))
        print(f"flip {i + 1}/{args.flips}: {trials[-1]}", flush=True)
    kills = [t for t in trials if t["kind"] == "kill"]
    flips = [t for t in trials if t["kind"] == "flip"]
    summary = {
        "kills": len(kills),
        "kills_that_killed": sum(t["killed"] for t in kills),
        "kills_ending_identical": sum(t["identical"] for t in kills),
        "flips": len(flips),
        "flips_refused_cleanly": sum(t.get("outcome") == "refused" for t in flips),
        "flips_resumed_identical": sum(t.get("outcome") == "resumed" and t["identical"] for t in flips),
        "flips_found_by_verify": sum(t["verify_exit"] != 0 for t in flips),
        "silent_wrong_results": sum(t["silent_wrong"] for t in trials),
        "lost_checkpoints": sum(t.get("lost_checkpoint", False) for t in kills),
        "seconds": round(time.monotonic() - t0, 1),
        "seed": args.seed,
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"summary": summary, "trials": trials}, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
