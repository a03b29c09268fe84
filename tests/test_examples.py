"""Every example runs top to bottom and prints the result it promises."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CASES = {
    "compose_step.py": "OK",
    "test_your_step.py": "all properties hold",
    "finetune_gpt2.py": "OK",
    "memory_ablation.py": "OK",
    "data_parallel.py": "OK",
}
QUIET = {"finetune_gpt2.py"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_and_reports_its_result(name):
    path = EXAMPLES / name
    if not path.exists():
        pytest.fail(f"example {name} is missing")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == CASES[name]
    if name in QUIET:  # nothing but the example's own lines: no library warnings or progress bars
        assert proc.stderr == "", proc.stderr[-2000:]
