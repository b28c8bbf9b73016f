"""benchmarks/accuracy_ner.py runs end to end on a tiny model in seconds and resumes."""

from __future__ import annotations

import json

from benchmarks import accuracy_ner


def test_accuracy_ner_quick_run_writes_every_record_and_model(tmp_path):
    out, models = tmp_path / "accuracy_ner.json", tmp_path / "models"
    args = ["--quick", "--threads", "1", "--out", str(out), "--models", str(models)]
    assert accuracy_ner.main(args) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    assert set(records) == {"teacher", "grain-10", "grain-5"}
    assert data["meta"]["train_sentences"] == 64 and data["meta"]["labels"][0] == "O"
    teacher = records["teacher"]
    assert 0 <= teacher["f1"] <= 1 and teacher["total_parameters"] > 0
    for name, target in accuracy_ner.RUNS.items():
        record = records[name]
        assert abs(record["density"] - target) < 0.02
        assert record["steps"] == 4 and record["minutes"] > 0
        for key in ("f1", "precision", "recall"):
            assert 0 <= record[key] <= 1
        if teacher["f1"]:
            assert abs(record["retention"] - record["f1"] / teacher["f1"]) < 1e-9
        before, after = record["encoder_parameters"]
        assert after < 0.2 * before
        assert record["total_parameters"][1] < record["total_parameters"][0]
        assert record["heads_left"] == sum(layer["heads"] for layer in record["layers"])
        assert (models / f"ner-{name}.pt2").exists()
    accuracy_ner.main(args)  # resumes: nothing is redone
    assert json.loads(out.read_text())["records"] == records
