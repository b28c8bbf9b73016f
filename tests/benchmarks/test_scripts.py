"""The benchmark scripts run end to end on a tiny model in seconds, so they cannot rot."""

from __future__ import annotations

import json

import pytest

from benchmarks import (
    accuracy_lm,
    distributed,
    evidence,
    peer_torch_pruning_lm,
    readme_tables,
    rewrite_speed,
    step_cost,
)


def test_rewrite_speed_quick_run_writes_results_and_a_readme_section(tmp_path):
    out = tmp_path / "rewrite_speed.json"
    rewrite_speed.main(
        [
            "--quick",
            "--only",
            "bert",
            "--kept",
            "0.2",
            "--patterns",
            "spread",
            "unequal",
            "--buckets",
            "1",
            "4",
            "--threads",
            "1",
            "--compile-threads",
            "--reps",
            "1",
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    records = data["records"]
    assert set(records) == {"threads=1/eager/kept=0.2/spread", "threads=1/eager/kept=0.2/unequal"}
    for record in records.values():
        assert {"dense", "bucket=1", "bucket=4", "uniform"} <= set(record["speedup"])
        assert record["flops_ratio"] > 1
        assert abs(record["density"] - 0.2) < 0.1
    section = readme_tables.rewrite_speed_section(data)
    assert "| 20% | spread |" in section and "bucket=4" in section
    readme_tables.rewrite_speed_plot(data, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    rewrite_speed.main(
        [
            "--quick",
            "--only",
            "bert",
            "--kept",
            "0.2",
            "--patterns",
            "spread",
            "--buckets",
            "1",
            "--threads",
            "1",
            "--compile-threads",
            "--reps",
            "1",
            "--out",
            str(out),
        ]
    )  # resumes: nothing new to measure
    assert json.loads(out.read_text())["records"] == records


def test_rewrite_speed_quick_llama_rows_join_the_store_and_the_section(tmp_path):
    out = tmp_path / "rewrite_speed.json"
    rewrite_speed.main(
        [
            "--quick",
            "--only",
            "bert",
            "--kept",
            "0.2",
            "--patterns",
            "spread",
            "--buckets",
            "4",
            "--threads",
            "1",
            "--compile-threads",
            "--reps",
            "1",
            "--out",
            str(out),
        ]
    )
    rewrite_speed.main(
        [
            "--quick",
            "--only",
            "llama",
            "--kept",
            "0.2",
            "--patterns",
            "concentrated",
            "spread",
            "--buckets",
            "4",
            "--threads",
            "1",
            "--compile-threads",
            "--reps",
            "1",
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    llama = {k: r for k, r in data["records"].items() if k.startswith("llama/")}
    assert set(llama) == {
        "llama/batch=2/seq=16/threads=1/eager/kept=0.2/concentrated",
        "llama/batch=2/seq=16/threads=1/eager/kept=0.2/spread",
    }
    assert "threads=1/eager/kept=0.2/spread" in data["records"]  # the BERT row is kept
    for record in llama.values():
        assert {"dense", "bucket=4", "uniform"} <= set(record["speedup"])
        assert record["flops_ratio"] > 1 and abs(record["density"] - 0.2) < 0.1
    section = readme_tables.rewrite_speed_section(data)
    assert "Llama-shaped" in section and "| 20% | concentrated |" in section
    assert section.count("| 20% | spread |") == 2  # one BERT row, one Llama row
    compiled = {
        k.replace("/eager/", "/compiled/"): {
            **r,
            "mode": "compiled",
            "compile_seconds": {n: 12.0 for n in r["speedup"]},
        }
        for k, r in llama.items()
    }
    lines = "\n".join(readme_tables.llama_speed_lines(compiled))
    assert "1 thread, torch.compile" in lines and "| 12 s, 12 s |" in lines


def test_distributed_quick_run_records_1_and_2_processes_and_keeps_them(tmp_path, capsys):
    out = tmp_path / "distributed.json"
    distributed.main(["--quick", "--steps", "2", "--warmup", "1", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    assert {r["processes"] for k, r in records.items() if k != "tiny/scaling"} == {1, 2}
    assert all(records[f"tiny/processes={n}"]["steps_per_second"] > 0 for n in (1, 2))
    scaling = records["tiny/scaling"]
    assert scaling["efficiency"] == pytest.approx(scaling["speedup"] / 2)
    distributed.main(["--quick", "--processes", "2", "--out", str(out)])
    assert "tiny/processes=2: recorded, kept" in capsys.readouterr().out


def test_step_cost_quick_run(tmp_path):
    out = tmp_path / "step_cost.json"
    step_cost.main(["--quick", "--steps", "2", "--out", str(out)])
    record = json.loads(out.read_text())["records"]["tiny/threads=1"]
    assert record["ratio"] > 0 and set(record["seconds"]) == {"plain", "grain"}


def test_accuracy_lm_smoke_run_trains_a_teacher_prunes_it_and_resumes(tmp_path):
    out, models = tmp_path / "accuracy_lm.json", tmp_path / "models"
    args = [
        "--smoke",
        "--only",
        "grain-20",
        "head-20",
        "tp-20",
        "--out",
        str(out),
        "--models",
        str(models),
    ]
    assert accuracy_lm.main(args) == 0
    data = json.loads(out.read_text())
    records, meta = data["records"], data["meta"]
    assert set(records) == {"teacher", "grain-20", "head-20", "tp-20", "intervals"}
    assert records["grain-20"]["seed"] == 0
    assert meta["train_reviews"] == 400 and meta["held_out_reviews"] == 40
    assert meta["teacher_training"]["steps"] == 20 and meta["held_out_tokens"] > 0
    teacher = records["teacher"]
    assert 1 < teacher["perplexity"] < meta["shape"]["vocab"]
    for name in ("grain-20", "head-20", "tp-20"):
        record = records[name]
        assert record["steps"] == 4 and 0.1 < record["density"] <= 0.21
        assert abs(record["ratio"] - record["perplexity"] / teacher["perplexity"]) < 1e-9
        before, after = record["encoder_parameters"]
        assert after < 0.25 * before
        assert record["speed"]["speedup"] > 0 and set(record["speed"]["ms"]) == {"dense", "compact"}
        assert (models / f"lm-smoke-{name}.pt2").exists()
    assert records["head-20"]["overrides"] == {"granularity": "head"}
    # torch-pruning's student: pruned to GRAIN's unit parameters, counted against the teacher's
    tp = records["tp-20"]
    assert tp["encoder_parameters"][0] == records["grain-20"]["encoder_parameters"][0]
    assert tp["torch_pruning"]["target"] == records["grain-20"]["encoder_parameters"][1]
    assert tp["total_parameters"][0] == teacher["total_parameters"]
    intervals = records["intervals"]
    assert set(intervals) == {
        "grain-20 vs head-20",
        "grain-20 vs tp-20",
        "grain-20 vs teacher",
        "head-20 vs teacher",
    }
    for pair, r in intervals.items():
        a, b = pair.split(" vs ")
        assert abs(r["difference"] - (records[a]["perplexity"] - records[b]["perplexity"])) < 1e-3
        assert r["low"] <= r["difference"] <= r["high"] and r["resamples"] == 200
        assert r["seeds"] == [0]
    assert accuracy_lm.main(args) == 0  # resumes: teacher cached, nothing redone
    assert json.loads(out.read_text())["records"] == records
    # a second seed of grain-20 alone: its pairs keep seed 0 only (head-20 has no seed 1)
    assert accuracy_lm.main([*args[:2], "grain-20", *args[5:], "--seeds", "1"]) == 0
    records = json.loads(out.read_text())["records"]
    assert records["grain-20-s1"]["seed"] == 1
    assert records["intervals"]["grain-20 vs head-20"]["seeds"] == [0]
    assert records["intervals"]["grain-20 vs teacher"]["seeds"] == [0, 1]
    section = evidence.lm_section(json.loads(out.read_text()))
    assert "| GRAIN | " in section and "| whole heads + FFN | " in section
    assert (
        "Not run yet: grain-10, grain-5, head-5, tp-10, tp-5 (" in section
        and "#527" in section
        and "1.25x" in section
    )
    assert "- grain-20 - head-20: " in section


def test_torch_pruning_prunes_a_gqa_llama_to_what_its_masked_dense_model_computes():
    # a tiny Llama with 2 query heads per key/value group (the case that hangs unpatched):
    # kept groups, heads and FFN channels; the pruned logits are the dense model's with the
    # removed heads' W_O columns and FFN channels' down columns zeroed (asserted inside)
    assert peer_torch_pruning_lm.main(["--density", "0.5", "0.2"]) == 0


def test_targets_section_says_met_or_not_from_the_means_intervals_and_seeds():
    def ner_run(retention, seed, label="GRAIN"):
        return {
            "f1": retention / 2,
            "retention": retention,
            "seed": seed,
            "label": label,
            "target_density": 0.10,
            "steps": 50,
        }

    ner = {
        "meta": {"temperature": 1.0, "epochs": 20.0},
        "records": {
            "teacher": {"f1": 0.5},
            "grain-10": ner_run(0.80, 0),
            "grain-10-s1": ner_run(0.84, 1),
            "grain-10-s2": ner_run(0.82, 2),
            "grain-10-kdall": ner_run(0.79, 0, "GRAIN, every position distilled"),
            "intervals": {
                "grain-5 vs head-5": {"difference": 0.1, "low": 0.02, "high": 0.2},
                "grain-10 vs grain-10-kdall": {"difference": 0.01, "low": -0.02, "high": 0.03},
            },
        },
    }
    lm = {
        "records": {
            "grain-20": {"ratio": 1.3},
            "intervals": {
                "grain-5 vs head-5": {"difference": -5.0, "low": -9.0, "high": 1.0, "seeds": [0, 1]}
            },
        }
    }
    text = evidence.targets_section(None, ner, lm)
    assert (
        "GRAIN keeps 82.0% ± 2.0% (3 seeds) (F1 41.00% ± 1.00% (3 seeds) against the "
        "teacher's 50.00%): **not met**" in text
    )
    assert (
        "(F1 retention; 20 epochs, 50 steps, temperature 1, unless the name says otherwise): "
        "GRAIN, every position distilled 79.0%." in text
    )
    assert "GRAIN is at 1.30x: **not met**" in text
    assert "Twitter NER: entity F1 +10.00% [+2.00%, +20.00%] (1 seed), GRAIN ahead" in text
    assert "Llama LM: perplexity -5.00 [-9.00, +1.00] (2 seeds), not ahead" in text
    assert "GRAIN is ahead on 1 of 3 (Twitter NER): **not met**" in text
    # grain-5 and head-5 have no records here: only the compared runs that ran are counted
    assert "**not met**; fewer seeds (their count) for Twitter NER: grain-10-kdall (1)." in text
    ner["records"]["grain-10"]["retention"] = 0.98
    assert "GRAIN keeps 88.0% ± 8.7% (3 seeds)" in evidence.targets_section(None, ner, None)

    # Rotten Tomatoes: the runs in an interval count, the torch-pruning ones included: those
    # at 5% and GRAIN plain and latency-aware at 10%, of the current teacher; the others
    # (another density, the earlier teacher's) are named as not counted
    def rt_run(density, accuracy=0.8, seed=0):
        return {"target_density": density, "accuracy": accuracy, "retention": 1.0, "seed": seed}

    rt = {
        "records": {
            "teacher": {"accuracy": 0.8},
            **{f"grain-10{s}": rt_run(0.10, seed=i) for i, s in enumerate(("", "-s1", "-s2"))},
            "latency-10": rt_run(0.10),
            "grain-20": rt_run(0.20),
            "grain-ema98-5": rt_run(0.05, accuracy=0.7),
        }
    }
    peer = {"records": {"teacher": {"accuracy": 0.8}, "tp-5": rt_run(0.05), "tp-10": rt_run(0.1)}}
    text = evidence.targets_section(rt, None, None, peer)
    assert "fewer seeds (their count) for Rotten Tomatoes: latency-10 (1), tp-5 (1)." in text
    assert "Not counted, being in no interval: Rotten Tomatoes grain-20 (1), " in text
    assert "grain-ema98-5 (1), tp-10 (1)." in text


def test_readme_sections_are_replaced_between_markers():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb"
    assert readme_tables.replace_section(text, "x", "new") == (
        "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb"
    )


def test_step_cost_and_example_sections_render():
    cost = {
        "records": {
            "minilm/threads=1": {
                "model": "m",
                "threads": 1,
                "steps": 3,
                "ratio": 1.5,
                "seconds": {"plain": 2.0, "grain": 3.0},
            }
        }
    }
    assert "3.00 s against 2.00 s" in readme_tables.step_cost_section(cost)
    example = {
        "threads": 2,
        "minutes": 16.7,
        "teacher_accuracy": 0.8,
        "student_accuracy": 0.78,
        "retention": 0.975,
        "density": 0.1,
        "encoder_parameters": [100, 10],
        "total_parameters": [200, 110],
        "speedup_batch32": 4.7,
    }
    section = readme_tables.example_section(example)
    assert "78.00% (97.5% retained)" in section and "4.7x" in section


def test_readme_is_up_to_date_with_the_results():
    """The committed README holds exactly what readme_tables generates from the results."""
    text = readme_tables.README.read_text()
    generated = readme_tables.sections()
    assert {"rewrite_speed", "step_cost", "example"} <= set(generated)
    for name, body in generated.items():
        assert f"<!-- {name}:start -->\n{body}\n<!-- {name}:end -->" in text, name


def test_architectures_records_exact_and_refused_models_and_a_readme_table(tmp_path):
    from benchmarks import architectures

    out = tmp_path / "architectures.json"
    assert architectures.main(["--only", "OPT", "ALBERT", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    records = data["records"]
    assert records["OPT/eager"]["status"] == records["OPT/sdpa"]["status"] == "exact"
    assert records["OPT/sdpa"]["parameter_count_matches"]
    assert records["ALBERT/eager"]["status"] == "refused"
    assert "share the weight" in records["ALBERT/eager"]["message"]
    table = architectures.section(data)
    assert "| OPT | exact | exact | 2 / 2 |" in table and "| ALBERT | refused |" in table
