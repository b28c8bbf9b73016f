"""benchmarks/accuracy_ner.py runs end to end on a tiny model in seconds and resumes."""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import accuracy_ner, evidence


def test_accuracy_ner_quick_run_writes_every_record_model_and_interval(tmp_path):
    out, models = tmp_path / "accuracy_ner.json", tmp_path / "models"
    args = ["--quick", "--threads", "1", "--out", str(out), "--models", str(models)]
    args += ["--only", "grain-5", "head-5", "--seeds", "0", "1", "--resamples", "50"]
    assert accuracy_ner.main(args) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    assert set(records) == {"teacher", "grain-5", "head-5", "grain-5-s1", "head-5-s1", "intervals"}
    assert data["meta"]["train_sentences"] == 64 and data["meta"]["labels"][0] == "O"
    teacher = records["teacher"]
    assert 0 <= teacher["f1"] <= 1 and teacher["total_parameters"] > 0
    assert len(teacher["sentences"]) == data["meta"]["held_out_sentences"]
    for key in ("grain-5", "grain-5-s1"):
        assert abs(records[key]["density"] - 0.05) < 0.02
    for key in ("grain-5", "head-5", "grain-5-s1", "head-5-s1"):
        record = records[key]
        assert record["seed"] == (1 if key.endswith("-s1") else 0)
        assert record["steps"] == 4 and record["minutes"] > 0
        for metric in ("f1", "precision", "recall"):
            assert 0 <= record[metric] <= 1
        if teacher["f1"]:
            assert abs(record["retention"] - record["f1"] / teacher["f1"]) < 1e-9
        counts = torch.tensor(record["sentences"])
        assert abs(float(accuracy_ner.f1_statistic(counts)) - record["f1"]) < 1e-9
        assert record["total_parameters"][1] < record["total_parameters"][0]
        assert record["heads_left"] == sum(layer["heads"] for layer in record["layers"])
        assert (models / f"ner-{key}.pt2").exists()
    interval = records["intervals"]["grain-5 vs head-5"]
    assert interval["seeds"] == [0, 1] and interval["resamples"] == 50
    assert interval["low"] <= interval["high"]
    accuracy_ner.main(args)  # resumes: nothing is redone
    assert json.loads(out.read_text())["records"] == records
    section = evidence.ner_section(data)
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| teacher", "| GRAIN", "| whole heads + FFN"]  # after the header
    assert "(2 seeds)" in section and "seeds 0, 1" in section
    assert "- grain-5 - head-5: " in section and "(2 seeds pooled)" in section
    # a run with a budget of its own has it stated next to everyone else's
    longer = {**records["grain-5"], "label": "GRAIN, 40 epochs", "steps": 8}
    longer["overrides"] = {**longer["overrides"], "epochs": 40.0}
    data["records"]["grain-10-40ep"] = longer
    section = evidence.ner_section(data)
    assert '(batches of 32, 4 steps; the row "GRAIN, 40 epochs": 40 epochs, 8 steps)' in section


def test_a_run_with_a_budget_of_its_own_gets_it_and_the_others_get_the_scripts():
    args = argparse.Namespace(quick=False, epochs=20.0, learning_rate=1e-4, temperature=1.0)
    runs = {run.name: run for run in accuracy_ner.RUNS}
    longer = accuracy_ner.student_config(runs["grain-10-40ep"], 1, args)
    plain = accuracy_ner.student_config(runs["grain-10"], 1, args)
    assert (longer.epochs, plain.epochs) == (40.0, 20.0)
    assert longer.ema_beta == plain.ema_beta == "auto" and longer.seed == plain.seed
    quick = argparse.Namespace(**{**vars(args), "quick": True})
    assert accuracy_ner.student_config(runs["grain-10-40ep"], 0, quick).steps == 4


def test_f1_statistic_pools_counts_over_sentences():
    counts = torch.tensor([[1, 2, 1], [0, 0, 1], [2, 2, 3]])
    # 3 matched of 4 predicted and 5 gold: 2 * 3 / 9
    assert abs(float(accuracy_ner.f1_statistic(counts)) - 6 / 9) < 1e-12
    assert float(accuracy_ner.f1_statistic(torch.zeros(2, 3))) == 0.0
