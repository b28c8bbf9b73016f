"""grainfx.predict: a folder that is not a complete output fails with the part it lacks.

Serving a real folder (labels, scores, padding, a fresh process) is tested end to end with the
command line that writes it, in test_cli.py."""

from __future__ import annotations

import json

import pytest

import grainfx
from grainfx import predict


@pytest.mark.parametrize("missing", ["model.pt2", "tokenizer.json", predict.SERVING_FILE])
def test_a_folder_missing_a_file_names_it(tmp_path, missing):
    for name in ("model.pt2", "tokenizer.json", predict.SERVING_FILE):
        if name != missing:
            (tmp_path / name).write_text("{}")
    with pytest.raises(predict.FolderError, match=f"has no {missing}: pass a folder written"):
        grainfx.load(tmp_path)


@pytest.mark.parametrize(
    "record",
    [
        "not json",
        json.dumps({"format": "something else", "version": predict.VERSION}),
        json.dumps({"format": predict.FORMAT, "version": predict.VERSION, "unknown": 1}),
    ],
)
def test_an_unreadable_serving_record_says_to_write_the_folder_again(tmp_path, record):
    path = tmp_path / predict.SERVING_FILE
    path.write_text(record)
    with pytest.raises(predict.FolderError, match="write the folder again with grainfx compress"):
        predict.Serving.read(path)


def test_a_broken_tokenizer_is_named(tmp_path):
    serving = predict.Serving("classification", ("neg", "pos"), 16, 0, "[PAD]")
    (tmp_path / "model.pt2").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{broken")
    (tmp_path / predict.SERVING_FILE).write_text(serving.to_json())
    assert predict.Serving.read(tmp_path / predict.SERVING_FILE) == serving
    with pytest.raises(predict.FolderError, match="tokenizer.json is not a readable tokenizer"):
        grainfx.load(tmp_path)


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"task": "translation"}, "task must be one of"),
        ({"labels": ()}, "needs its label names"),
        ({"max_length": 0}, "max_length must be an integer in 1..1000000, got 0"),
        ({"padding_side": "middle"}, "'right' or 'left'"),
        ({"max_length": 10**7}, "max_length must be an integer in 1..1000000"),
        ({"max_length": True}, "max_length must be an integer"),
        ({"pad_id": -1}, "pad_id must be an integer >= 0, got -1"),
        ({"pad_id": "0"}, "pad_id must be an integer >= 0, got '0'"),
        ({"pad_token": None}, "pad_token must be a token"),
        ({"labels": "ab"}, "labels must be a list of names"),
        ({"labels": ("a", "a")}, "labels must be distinct names"),
        ({"task": ["classification"]}, "task must be one of"),
    ],
)
def test_serving_records_are_validated_on_construction(fields, problem):
    base = {"task": "classification", "labels": ("a",), "max_length": 8, "pad_id": 0}
    with pytest.raises(ValueError, match=problem):
        predict.Serving(**{**base, "pad_token": "[PAD]", **fields})
