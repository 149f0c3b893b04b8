"""The speed harness (benchmarks/run.py): its smallest cases run and write the JSON the README
describes. Timings are not checked here (the suite never passes or fails on speed)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def harness():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_harness_runs_a_training_case_and_a_command_and_writes_its_json(tmp_path, capsys):
    bench = harness()
    out = tmp_path / "out.json"
    bench.main(["--quick", "--only", "cnn_digits", "cli_help", "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["machine"]["matmul_gflops"] > 0 and report["machine"]["device"] == "cpu"
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"cnn_digits", "cli_help"}
    for row in rows.values():
        assert set(bench.RESULT_KEYS) <= set(row)
        assert row["dlrun_s"] > 0 and row["plain_s"] > 0 and row["peak_rss_mb"] > 0
        assert math.isclose(row["ratio"], row["dlrun_s"] / row["plain_s"])  # one repeat
        assert row["spread"] == 0 and row["peak_gpu_mb"] is None
    cnn = rows["cnn_digits"]
    assert cnn["flops_per_item"] > 0 and 0 < cnn["of_matmul"] < 1
    assert "cnn_digits" in capsys.readouterr().out


def test_every_family_has_a_case():
    names = [c.name for c in harness().cases()]
    for family in ("cnn_digits", "cnn_mnist", "tabular_adult_bs64", "tabular_adult_bs1024", "rnn_lstm"):
        assert family in names
    assert {
        "rnn_qrnn",
        "transformer_lm",
        "lr_find_100",
        "cli_help",
        "cli_cfg_job",
        "time_to_first_step",
    } <= set(names)


def test_rival_columns_are_left_out_where_fastai_and_lightning_are_not_importable(monkeypatch):
    bench = harness()
    import rivals  # benchmarks/rivals.py: run.py put its folder on sys.path

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name in ("fastai", "lightning") else find_spec(name, *args),
    )
    assert rivals.available() == []
    case = next(c for c in bench.cases() if c.name == "cnn_digits")
    row = bench.training_case(case, quick=True, repeats=1, device="cpu")
    assert row["dlrun_s"] > 0 and not [k for k in row if k.startswith(("fastai", "lightning"))]
    assert "fastai" not in bench.fmt_row({**row, "name": "cnn_digits", "peak_rss_mb": 1.0})


def test_rival_columns_are_medians_over_the_repeats():
    harness()
    import rivals

    row = rivals.columns({"lightning": [3.0, 6.0, 2.0]}, [1.0, 2.0, 2.0])
    assert row == {"lightning_s": 3.0, "lightning_ratio": 3.0}  # ratios 3, 3, 1
    assert rivals.Timed(seconds=2.0, items=100, model=None).per(50) == 1.0
