"""benchmarks/per_forward.py: the tables it prints are made of possible figures only."""

import importlib.util
import io
import itertools

import torch
from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("per_forward", ROOT / "benchmarks" / "per_forward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_both_tables_with_ratios_and_floors():
    bench = _load()
    results = bench.run("cpu", repeats=2, threads=("1",), shapes=[(200, 136)], wavelets=("db1", "db4"), tokens=64)
    (run,) = results["runs"]
    assert [r["wavelet"] for r in run["merge"]] == ["db1", "db4"]
    for row in run["merge"] + run["bypass"]:
        assert row["waveft"]["min"] > 0 and row["lora"]["min"] > 0 and row["ratio"] > 0
    assert run["bypass"][1]["floor"] == (2688 + 8 * 336) / 2688  # rank round(2592/336) = 8, p = 8·336, L = 8
    out = io.StringIO()
    bench.print_tables(results, out)
    text = out.getvalue()
    assert "| 200x136 | db4 | 2688 (r=8) |" in text and "op-count floor" in text


def test_an_impossible_timer_reading_is_measured_again_then_flagged(monkeypatch):
    bench = _load()
    clock = itertools.count(100.0, -1.0)  # a clock that runs backwards: every reading is negative
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    calls = []
    times = bench.interleaved({"a": lambda: calls.append(1)}, torch.device("cpu"), repeats=2)
    assert times == {"a": [None, None]} and len(calls) == 1 + 2 * 3  # warm-up, then three tries per repeat
    assert bench.summary(times["a"]) is None and bench.ratio(None, {"median": 1.0}) is None
    assert "not shown" in bench._cell(None)
