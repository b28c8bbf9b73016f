"""grainfx.preflight: unwritable places and a short disk fail before training, in one line."""

from __future__ import annotations

import pytest
import torch

from grainfx import preflight


def test_a_writable_folder_yet_to_be_made_is_checked_in_its_nearest_ancestor(tmp_path):
    assert preflight.writable_folder(tmp_path / "a" / "b", "the output", "fix") == tmp_path
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_a_file_in_the_way_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(preflight.PreflightError, match="is a file, not a folder; choose"):
        preflight.writable_folder(tmp_path / "out" / "x", "the output --out", "choose another")


def test_model_bytes_counts_shared_tensors_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert preflight.model_bytes(model) == (16 + 4 + 4) * 4
    assert preflight.checkpoint_bytes(model) == preflight.CHECKPOINT_COPIES * 24 * 4


def test_needs_on_one_disk_add_up_and_a_shortfall_names_sizes_and_what(tmp_path):
    preflight.free_space([(tmp_path, 1024, "the model")], "choose another --out")
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.free_space(
            [(tmp_path, 2**60, "the checkpoints"), (tmp_path / "new", 2**60, "the model")],
            "choose another --out",
        )
    message = str(caught.value)
    assert "not enough free disk space" in message and "the checkpoints and the model" in message
    assert "GB needed" in message and message.endswith("choose another --out")
