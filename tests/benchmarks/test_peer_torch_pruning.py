"""benchmarks/peer_torch_pruning.py runs end to end on a tiny BERT and records what it claims."""

from __future__ import annotations

import json

import torch

from benchmarks import peer_torch_pruning


def test_quick_run_prunes_to_the_target_and_records_it(tmp_path):
    out = tmp_path / "peer.json"
    argv = [
        "--quick",
        "--threads",
        "1",
        "--reps",
        "1",
        "--out",
        str(out),
        "--models",
        str(tmp_path / "models"),
    ]
    assert peer_torch_pruning.main(argv) == 0
    records = json.loads(out.read_text())["records"]
    assert set(records) == {"teacher", "capabilities", "tp-10", "tp-5"}
    teacher = records["teacher"]
    dense_heads = sum(layer["heads"] for layer in teacher["layers"])
    for name in ("tp-10", "tp-5"):
        run = records[name]
        before, after = run["encoder_parameters"]
        assert before == teacher["encoder_parameters"]
        assert abs(after - run["target_encoder_parameters"]) <= 0.02 * before
        assert run["total_parameters"][1] < run["total_parameters"][0]
        # the same head count in every layer (torch-pruning cannot empty one)
        assert 0 < run["heads_left"] < dense_heads and len(set(run["heads"])) == 1
        assert run["heads"][0] >= 1 and len(run["heads"]) == len(teacher["layers"])
        assert sum(run["ffn"]) == run["plan"]["ffn"]
        assert 0 <= run["accuracy"] <= 1 and run["logits_shape"] == [32, 2]
        assert run["speedup_batch32"] > 0 and run["steps"] == 4 and run["seed"] == 0
        assert run["accuracy"] == run["correct"].count("1") / len(run["correct"])
        assert (tmp_path / "models" / f"rt-{name}.pt").exists()
    caps = records["capabilities"]
    assert caps["unequal_head_sizes"]["possible"] is False
    assert caps["saving"]["torch_save_module_without_hf_hooks"]["works"] is True
    assert caps["saving"]["save_pretrained"]["works"] is False
    assert peer_torch_pruning.main(argv) == 0  # resumes: nothing new to run
    assert json.loads(out.read_text())["records"] == records


def test_encoder_count_is_grainfx_s():
    from transformers import BertConfig, BertForSequenceClassification

    import passes

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=2,
        )
    ).eval()
    batch = {
        "input_ids": torch.randint(0, 100, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }
    structure = passes.discover(passes.capture(model, batch))
    assert peer_torch_pruning.encoder_parameters(model) == structure.unit_params


def test_plan_keeps_a_head_per_layer_and_spends_the_rest_on_ffn():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=2,
        )
    )
    dense = peer_torch_pruning.encoder_parameters(model)
    plan = peer_torch_pruning.plan(model, round(0.25 * dense))
    assert plan["heads_per_layer"] == 1 and plan["heads"] == 2
    assert abs(plan["encoder_parameters"] - 0.25 * dense) < 65
    assert int(4 * (1 - plan["head_ratio"])) == 1 and int(128 * (1 - plan["ffn_ratio"])) == 32
