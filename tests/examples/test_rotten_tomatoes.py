"""The README's main job runs end to end (a few steps of each phase, real model and data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rotten_tomatoes_example_runs_and_writes_its_results(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAINFX_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(ROOT))
    from examples import rotten_tomatoes
    from grainfx import demo

    train, test = demo.rotten_tomatoes()
    assert (len(train), len(test)) == (7678, 852)
    assert sum(y for _, y in test) == len(test) // 2  # stratified
    assert demo.rotten_tomatoes()[1][:5] == test[:5]  # fixed split
    out = tmp_path / "rt.pt2"
    rotten_tomatoes.main(
        ["--epochs", "0.01", "--teacher-epochs", "0.01", "--threads", "1", "--out", str(out)]
    )
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert 0.3 < summary["student_accuracy"] <= 1 and summary["speedup_batch32"] > 0
    assert abs(summary["density"] - 0.10) < 0.005
    assert out.exists() and out.with_suffix(".json").exists()
    assert any((tmp_path / "cache").iterdir())  # the teacher was cached
