import argparse
import json
import sys

import pytest
import torch

import functional_memopt as fm
from functional_memopt.app import memory_report
from functional_memopt.memory import hygiene
from functional_memopt.train.grad import value_and_grad
from functional_memopt.memory.ledger import MemorySettings, predict_memory
from functional_memopt.memory.measure import (
    TensorMemoryTracker,
    measure_memory,
    untied_loss_fn,
    untied_params,
)
from functional_memopt.memory.hygiene import with_memory_hygiene
from functional_memopt import adamw
from functional_memopt.train.step import init_train_state, make_loss_fn, make_train_step
from functional_memopt.testing import assert_trees_close, assert_trees_equal

CFG = fm.ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)


def _batch(index=0, rows=4, seq=32):
    return fm.sample_batch(fm.load_corpus(), rows, seq, seed=0, index=index)


def test_the_tensor_tracker_counts_each_storage_once_and_keeps_the_peak():
    tracker = TensorMemoryTracker()
    with tracker:
        a = torch.ones(1024)  # 4096 bytes
        view = a[:10]  # no new storage
        b = a * 2  # 4096 more: the peak
        del a, b
        c = torch.ones(256, dtype=torch.float64)  # 2048 bytes; a lives on through the view
    assert tracker.peak == 8192
    assert tracker.live == 4096 + 2048
    del view, c
    assert tracker.live == 0


def test_tracked_tensors_made_before_entering_count_from_the_start():
    x = torch.zeros(100)
    tracker = TensorMemoryTracker().track({"x": x, "same": x[1:]})
    assert tracker.live == tracker.peak == 400


def test_the_untied_loss_equals_the_tied_loss_while_the_head_is_a_copy_of_wte():
    params, batch = fm.init_params(CFG), _batch()
    loss_sum = lambda f: lambda p, b: f(p, b)[0]  # noqa: E731
    loss_t, g_t = value_and_grad(loss_sum(make_loss_fn(CFG)))(params, batch)
    loss_u, g_u = value_and_grad(loss_sum(untied_loss_fn(CFG)))(untied_params(params), batch)
    assert torch.equal(loss_t, loss_u)
    # The tied leaf's gradient is the sum of the embedding-path and head-path gradients.
    g_u["wte"] = g_u["wte"] + g_u.pop("lm_head")
    assert_trees_close(g_u, g_t, rtol=1e-5, atol=1e-7)


def test_an_untied_model_trains_with_its_own_head_leaf():
    params = untied_params(fm.init_params(CFG))
    opt = adamw(1e-2)
    step = make_train_step(CFG, opt, loss_fn=untied_loss_fn(CFG, remat="all"))
    state, _ = step(init_train_state(params, opt), _batch())
    assert not torch.equal(state.params["lm_head"], state.params["wte"])


def test_measured_cpu_peaks_are_within_a_stated_factor_of_the_prediction():
    # One fresh subprocess. The live-tensor peak counts what the ledger counts: within 3%. The RSS
    # also pays for malloc's slack, thread pools and kernel scratch: a loose factor of 0.8 to 3.
    cfg = fm.ModelConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=128)
    got = measure_memory(cfg, batch_size=16, seq_len=128, steps=1, method="rss")
    predicted = predict_memory(cfg, batch_size=16, seq_len=128).total
    assert got.method == "rss" and got.peak_bytes == got.rss_bytes
    assert abs(got.tensor_bytes / predicted - 1) < 0.03, (got, predicted)
    assert 0.8 < got.rss_bytes / predicted < 3.0, (got, predicted)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="best"), "method must be one of"),
        (dict(method="cuda"), "does not measure device"),
        (dict(settings=MemorySettings(zero_stage=1, world_size=2)), "ZeRO"),
    ],
)
def test_measure_memory_rejects_what_it_cannot_measure(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_memory(CFG, batch_size=2, seq_len=8, **kwargs)


def _steps(wrap, n=5):
    opt = adamw(1e-2)
    state = init_train_state(fm.init_params(CFG), opt, policy="mixed_bf16")
    step = wrap(make_train_step(CFG, opt, policy="mixed_bf16", accum_steps=2))
    metrics = []
    for i in range(n):
        state, m = step(state, _batch(i))
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("every", [1, 2, 3])
def test_hygiene_collects_garbage_exactly_every_n_steps(every, monkeypatch):
    calls = []
    monkeypatch.setattr(hygiene.gc, "collect", lambda *a: calls.append(1))  # counted, not run: full
    # collections take ~1 s in a test process that holds many objects
    _, metrics = _steps(lambda s: with_memory_hygiene(s, gc_every=every), n=7)
    assert len(calls) == 7 // every
    assert [bool(m["mem_gc"]) for m in metrics] == [(i + 1) % every == 0 for i in range(7)]


def test_hygiene_off_never_collects(monkeypatch):
    calls = []
    monkeypatch.setattr(hygiene.gc, "collect", lambda *a: calls.append(1))
    _steps(lambda s: with_memory_hygiene(s), n=3)
    assert calls == []


def test_hygiene_adds_memory_metrics_and_keeps_the_step_s_own():
    _, plain = _steps(lambda s: s, n=1)
    _, wrapped = _steps(lambda s: with_memory_hygiene(s, gc_every=1), n=1)
    assert set(wrapped[0]) == set(plain[0]) | {"mem_gc", "mem_rss"}
    assert int(wrapped[0]["mem_rss"]) > 0
    _, quiet = _steps(lambda s: with_memory_hygiene(s, gc_every=1, stats=False), n=1)
    assert set(quiet[0]) == set(plain[0])


def test_hygiene_changes_memory_not_results():
    plain, m_plain = _steps(lambda s: s, n=3)
    cleaned, m_clean = _steps(lambda s: with_memory_hygiene(s, gc_every=2), n=3)  # collects after step 2
    assert_trees_equal(cleaned, plain)
    assert_trees_equal([m["loss"] for m in m_clean], [m["loss"] for m in m_plain])


def test_hygiene_rejects_a_negative_interval():
    with pytest.raises(ValueError, match="gc_every"):
        with_memory_hygiene(lambda s, b: (s, {}), gc_every=-1)


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    memory_report.add_memory_arguments(parser)
    code = memory_report.memory_command(parser.parse_args(argv))
    return code, capsys.readouterr().out


def test_the_memory_command_prints_the_ablation_table_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "m.json"
    code, out = _run(["--preset", "tiny", "--no-measure", "--batch-size", "4", "--accum-steps", "2",
                      "--zero-stage", "1", "--world-size", "2", "--json", str(out_json)], capsys)
    assert code == 0
    for name in ("baseline", "mixed_bf16", "accum 2", "remat all", "tied", "zero1 x2", "all", "pred MiB"):
        assert name in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows][0] == "baseline" and [r["name"] for r in rows][-1] == "all"
    assert all(r["floor"] <= r["predicted_total"] for r in rows)
    assert rows[0]["predicted_total"] == sum(rows[0]["peak"].values())
    assert all(r["measured"] is None for r in rows)


def test_the_memory_table_shows_measured_peaks_and_their_ratios(capsys, monkeypatch):

    def fake(cfg, *, batch_size, seq_len, settings, **kw):  # stands in for the subprocess: 1.5x the prediction
        total = predict_memory(cfg, batch_size=batch_size, seq_len=seq_len, **settings._asdict()).total
        return memory_report.MemoryMeasurement(int(1.5 * total), "tensors", int(1.5 * total), None, None)

    monkeypatch.setattr(memory_report, "measure_memory", fake)
    code, out = _run(["--preset", "tiny", "--batch-size", "4"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:] if line.strip()}
    assert code == 0
    assert rows["baseline"][-4:-1] == ["1.500", "1.00", "1.00"]  # meas/pred, pred/base, meas/base
    assert rows["all"][-4] == "1.500" and float(rows["all"][-2]) == float(rows["all"][-3])
    assert float(rows["all"][-1]) >= 1.0  # pred/floor: no setting goes below the floor


def test_the_chart_is_a_png_its_path_is_printed_and_its_title_promises_no_unmeasured_markers(
        tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.png"
    titles = []
    plot = memory_report.plot_ablation
    monkeypatch.setattr(memory_report, "plot_ablation", lambda rows, p, *, title: (titles.append(title),
                                                                                  plot(rows, p, title=title)))
    _, out = _run(["--preset", "tiny", "--no-measure", "--chart", str(path)], capsys)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"memopt: chart written to {path}" in out
    assert titles[0].startswith("Predicted peak by item (not measured)") and "marker" not in titles[0]


def test_a_chart_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        _run(["--preset", "tiny", "--no-measure", "--chart", str(tmp_path / "m.png")], capsys)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--preset", "gpt5"], "unknown preset"),
        (["--batch-size", "6", "--accum-steps", "4"], "does not divide"),
        (["--policy", "fp12"], "get_policy"),
        (["--remat", "some"], "--remat"),
        (["--seq-len", "4096"], "block_size"),
    ],
)
def test_bad_memory_arguments_are_one_line_value_errors(argv, match, capsys):
    with pytest.raises(ValueError, match=match) as err:
        _run(argv + ["--no-measure"], capsys)
    assert "\n" not in str(err.value)
