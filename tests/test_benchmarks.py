"""Smoke test of the benchmark harness (benchmarks/run.py) on a microscopic model.

It checks the shape of what the harness writes, not how fast anything is: no timing thresholds.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, RUN, "--smoke", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return results, (out / "RESULTS.md").read_text()


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_results_have_every_section_and_the_run_metadata(smoke_results):
    results, _ = smoke_results
    for key in ("meta", "speed", "diagnostics", "memory", "compile", "gpu"):
        assert key in results, key
    meta = results["meta"]
    for key in ("torch", "threads", "date", "command", "cpu", "clock", "elapsed_s"):
        assert key in meta, key
    assert meta["threads"] == 1
    assert "error" not in results["speed"] and "error" not in results["diagnostics"]


def test_every_step_time_ratio_is_a_positive_finite_number(smoke_results):
    results, _ = smoke_results
    rows = results["speed"]["step_time"]
    assert {(r["precision"], r["accum"]) for r in rows} >= {("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8)}
    for row in rows:
        for key in ("func_s", "ref_s", "ratio", "paired_ratio", "wall_ratio"):
            assert _positive_finite(row[key]), (row["variant"], key, row[key])
        # The plain and donated steps have a target (1.00 at accumulation 1, 1.05 above); the other
        # variants are priced against the plain step in the cost table instead.
        plain = row["variant"] in (f"func a{row['accum']}", "func a1 donate")
        assert row["target"] == ((1.00 if row["accum"] == 1 else 1.05) if plain else None), row["variant"]
        assert isinstance(row["met"], bool) if plain else row["met"] is None


def test_technique_costs_cover_remat_accumulation_and_loss_scaling(smoke_results):
    results, _ = smoke_results
    costs = results["speed"]["costs"]
    kinds = {c["cost"].split(" (")[0] for c in costs}
    assert {"remat", "accumulation", "dynamic loss scale"} <= kinds
    for c in costs:
        assert _positive_finite(c["ratio"]), c


def test_memory_rows_pair_a_measurement_with_the_ledger(smoke_results):
    results, _ = smoke_results
    rows = results["memory"]["rows"]
    assert rows[0]["technique"].startswith("baseline")
    assert rows[-1]["technique"] in ("all", "all together", "all + donate")
    for row in rows:
        assert row["error"] is None, row
        assert _positive_finite(row["measured_bytes"])
        if row["predicted_bytes"] is not None:
            assert _positive_finite(row["measured_over_predicted"])
    assert set(results["memory"]["hygiene"]) == {"off", "every step"}


def test_sections_that_cannot_run_here_say_why(smoke_results):
    results, _ = smoke_results
    assert "skipped" in results["compile"]
    if results["meta"]["device"] == "cpu":
        assert "skipped" in results["gpu"]


def test_the_report_is_generated_from_the_results(smoke_results):
    results, text = smoke_results
    assert text.startswith("# Benchmark results")
    assert results["meta"]["command"] in text
    first = results["speed"]["step_time"][0]
    assert f"{first['ratio']:.3f}" in text
    for heading in ("## 1. Step time", "## 2. Cost", "## 3. torch.compile", "## 4. Memory", "## 5. GPU"):
        assert heading in text


def test_the_report_opens_with_the_targets_met_and_lists_each_missed_row(smoke_results):
    results, markdown = smoke_results
    rows = [r for r in results["speed"]["step_time"] if r["target"] is not None]
    rows += [c for c in results["speed"]["costs"] if c["target"] is not None]
    met = sum(bool(r["met"]) for r in rows) + bool(results["memory"].get("all_met"))
    total = len(rows) + ("all_met" in results["memory"]) + sum(
        r.get("within_tolerance") is not None for r in results["memory"]["rows"])
    met += sum(bool(r.get("within_tolerance")) for r in results["memory"]["rows"])
    first = markdown.split("\n## ")[1]
    assert first.startswith(f"Targets: {met} of {total} met"), first[:80]
    assert first.count("\n- ") == total - met


def test_only_reruns_some_sections_and_the_report_names_the_run_each_kept_section_came_from(smoke_results,
                                                                                           tmp_path):
    # Two --only runs in a row: the sections kept twice still name the first run, the one the
    # second run measured names it (neither is attributed to the latest run that merely kept it).
    results, _ = smoke_results
    (tmp_path / "results.json").write_text(json.dumps(results))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for only in ("speed", "gpu"):
        proc = subprocess.run([sys.executable, RUN, "--smoke", "--only", only, "--out", str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    first, speed_run = results["meta"]["command"], meta["section_runs"]["speed"]["command"]
    assert "--only speed" in speed_run and "--only" not in first
    assert {k: v["command"] for k, v in meta["section_runs"].items() if k != "speed"} == {
        k: first for k in meta["kept_from_previous_run"] if k != "speed"}
    header = (tmp_path / "RESULTS.md").read_text().split("## Targets")[0]
    assert f"speed (`{speed_run}`" in header and f"(`{first}`" in header
