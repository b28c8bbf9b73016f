"""benchmarks/accuracy_rt.py and benchmarks/speed.py end to end on a tiny BERT and tiny data,
and the README sections and plots drawn from what they write."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks import accuracy_rt, evidence, speed


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    argv = [
        "--quick",
        "--threads",
        "1",
        "--only",
        "grain-5",
        "head-5",
        "--out",
        str(root / "accuracy_rt.json"),
        "--models",
        str(root / "models"),
    ]
    assert accuracy_rt.main(argv) == 0
    return root, argv


def test_accuracy_sweep_records_each_run(sweep):
    root, argv = sweep
    data = json.loads((root / "accuracy_rt.json").read_text())
    records = data["records"]
    assert set(records) == {"teacher", "grain-5", "head-5"}
    assert 0 < records["teacher"]["accuracy"] <= 1
    for name, record in records.items():
        if name == "teacher":
            continue
        # whole heads are coarse: one is ~3% of this tiny encoder
        assert 0.05 - (0.035 if name == "head-5" else 0.01) < record["density"] <= 0.05
        assert record["retention"] == pytest.approx(
            record["accuracy"] / records["teacher"]["accuracy"]
        )
        assert record["encoder_parameters"][1] < record["encoder_parameters"][0]
        assert record["heads_left"] == sum(layer["heads"] for layer in record["layers"])
        assert record["seed"] == 0 and len(record["correct"]) == data["meta"]["held_out_rows"]
        assert record["accuracy"] == pytest.approx(
            record["correct"].count("1") / len(record["correct"])
        )
        assert (root / "models" / f"rt-{name}.pt2").exists()
        assert not (root / "models" / f"rt-{name}.ckpt").exists()
    assert records["head-5"]["heads_left"] > 0
    for layer in records["head-5"]["layers"]:  # head granularity: every kept head is whole
        assert set(layer["query_units"]) <= {layer["head_dim"]}
        assert set(layer["value_units"]) <= {layer["head_dim"]}
    assert (root / "models" / "rt-dense.pt2").exists()
    assert accuracy_rt.main(argv) == 0  # resumes: nothing new to run
    assert json.loads((root / "accuracy_rt.json").read_text())["records"] == records


def test_speed_sweep_times_every_model_and_the_bert_base_rows(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "speed.json"
    assert (
        speed.main(
            [
                "--quick",
                "--threads",
                "1",
                "--reps",
                "1",
                "--no-compile",
                "--models",
                str(root / "models"),
                "--accuracy",
                str(root / "accuracy_rt.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    records = data["records"]
    models = {"rt-grain-5", "rt-head-5", "bert-base-grain-5"}
    assert {f"{m}/eager/b={b},s={s}" for m in models for b, s in speed.SHAPES} == set(records)
    for record in records.values():
        assert record["speedup"]["dense"] == 1.0 and record["speedup"]["compact"] > 0
        assert record["flops_ratio"] > 1
        assert ("limit" in record["speedup"]) == (record["family"] == "bert-base")
    table = evidence.speed_section(data)
    assert "**bert-base**" in table and "| rt-grain-5 |" in table
    evidence.speedup_plot(data, tmp_path / "speedup.png")
    assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_accuracy_section_and_retention_plot(sweep, tmp_path):
    root, _ = sweep
    data = json.loads((root / "accuracy_rt.json").read_text())
    table = evidence.accuracy_section(data, None)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    assert [row.split(" | ")[0] for row in rows] == ["| GRAIN", "| whole heads + FFN"]
    evidence.retention_plot(data, None, None, tmp_path / "retention.png")
    assert (tmp_path / "retention.png").stat().st_size > 1000


def test_runs_of_an_earlier_teacher_are_set_apart(sweep):
    root, _ = sweep
    data = json.loads((root / "accuracy_rt.json").read_text())
    old = dict(data["records"]["head-5"])
    old.pop("correct")
    old["retention"] = old["accuracy"] / 0.5  # distilled from a teacher of 50%
    data["records"]["head-5"] = old
    table = evidence.accuracy_section(data, None)
    current, earlier = table.split("earlier teacher (50.00% held-out")
    assert "| GRAIN |" in current and "whole heads" not in current
    assert "| whole heads + FFN |" in earlier and "| GRAIN |" not in earlier


def test_speed_times_a_peer_student_captured_by_the_same_pass(sweep, tmp_path):
    root, _ = sweep
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("rt-dense.pt2", "rt-dense.json"):
        shutil.copy(root / "models" / name, folder / name)
    model, *_ = accuracy_rt.rt_setup(True)
    ffn = model.bert.encoder.layer[0]  # a structurally pruned student: half of one FFN
    keep = ffn.intermediate.dense.out_features // 2
    up, down = ffn.intermediate.dense, ffn.output.dense
    ffn.intermediate.dense = torch.nn.Linear(up.in_features, keep)
    ffn.output.dense = torch.nn.Linear(keep, down.out_features)
    torch.save(model, folder / "rt-tp-5.pt")
    torch.save(model, folder / "rt-tp-5-s1.pt")  # another seed: not timed
    peer = tmp_path / "peer.json"
    peer.write_text(json.dumps({"records": {"tp-5": {"density": 0.9}}}))
    out = tmp_path / "speed.json"
    argv = ["--quick", "--reps", "1", "--no-compile", "--only", "tp", "--models", str(folder)]
    assert speed.main([*argv, "--peer", str(peer), "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert set(records) == {f"rt-tp-5/eager/b={b},s={s}" for b, s in speed.SHAPES}
    for record in records.values():
        assert record["density"] == 0.9 and record["family"] == "rt"
        assert record["flops_ratio"] > 1 and record["speedup"]["compact"] > 0


def test_the_minilm_side_by_side_names_what_is_missing(sweep):
    root, _ = sweep
    data = json.loads((root / "accuracy_rt.json").read_text())
    speed_data = {"meta": {"threads": 1}, "records": {}}
    b, s = speed.SHAPES[1]
    speed_data["records"][f"rt-grain-5/eager/b={b},s={s}"] = {"speedup": {"compact": 7.5}}
    table = evidence.side_by_side_section(data, None, speed_data)
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| 7.50x |" in rows["| GRAIN"] and rows["| GRAIN"].count(" - ") == 2
    assert rows["| latency-5"].endswith("| - | - | - | - | - | - | - |")
    assert "| whole heads + FFN" in rows and "| tp-5" in rows
