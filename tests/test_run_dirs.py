"""Run and sweep directories: each run has its own however many start in the same second,
a sweep keeps its summary whatever its jobs do, `dlrun runs` reads past any bad summary.json."""

from __future__ import annotations

import json

from conftest import dlrun


def test_runs_shows_unreadable_summaries_and_goes_on(tmp_path):
    good = {
        "status": "completed",
        "monitor": "accuracy",
        "mode": "max",
        "best": {"accuracy": 0.9, "valid_loss": 0.3},
        "epochs": 2,
        "wall_s": 1.5,
    }
    bad = {
        "truncated": '{"status": "completed", "be',
        "empty": "",
        "a-list": "[1, 2]",
        "a-string": '"hello"',
        "no-status": json.dumps({"name": "something else"}),
        "odd-status": json.dumps({**good, "status": 3}),
        "text-metric": json.dumps({**good, "best": {"accuracy": "high"}}),
        "best-a-list": json.dumps({**good, "best": [0.9]}),
    }
    for name, text in {"good": json.dumps(good), **bad}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(text)
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    proc = dlrun("runs", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "10 runs" in proc.stdout
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│")}
    assert "0.9000" in lines["good"] and "completed" in lines["good"]
    for name in [*bad, "binary"]:
        assert "unreadable" in lines[name], proc.stdout
