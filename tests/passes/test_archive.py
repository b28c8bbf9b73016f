"""A crafted .pt2 runs nothing: each way torch.export.load runs code from an archive is refused
before torch reads the file, by grainfx.load and by predict, inspect and bench."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

import grainfx
import passes
from grainfx.cli import main
from grainfx.predict import SERVING_FILE, Serving
from passes.archive import check_archive
from passes.errors import UnsafeModelFileError
from tests.grainfx.test_cli import VOCAB
from tests.models import example_inputs
from tests.passes.test_serialize import compact

Records = dict[str, bytes]
WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


class Payload:
    """Pickles into a call that writes ``marker``: proof that unpickling ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def code(marker: Path) -> str:
    """A Python expression, true, that writes ``marker``."""
    return f"open({str(marker)!r}, 'w').write('ran') > 0"


def _edit_json(records: Records, name: str, edit: Callable[[dict], None]) -> None:
    record = json.loads(records[name])
    edit(record)
    records[name] = json.dumps(record).encode()


def pickled_weight(records: Records, marker: Path) -> None:
    def edit(config: dict) -> None:
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        records["data/weights/" + entry["path_name"]] = pickled(marker)

    _edit_json(records, WEIGHTS, edit)


def pickled_constant(records: Records, marker: Path) -> None:
    entry = {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    _edit_json(records, CONSTANTS, lambda config: config["config"].update(c=entry))
    records["data/constants/tensor_0"] = pickled(marker)


def pickled_sample_inputs(records: Records, marker: Path) -> None:
    records["data/sample_inputs/model.pt"] = pickled(marker)


def pickled_legacy_weights(records: Records, marker: Path) -> None:
    """A member of another name: torch reads ``data/weights/model.pt`` before the config."""
    records["data/weights/model.pt"] = pickled(marker)


def code_in_a_guard(records: Records, marker: Path) -> None:
    """torch ``exec``s the guards when the archive has sample inputs (here plain tensors, which
    ``weights_only`` unpickling accepts)."""
    _edit_json(records, PROGRAM, lambda program: program["guards_code"].append(code(marker)))
    buffer = io.BytesIO()
    inputs = example_inputs("bert-sdpa", 2, 8)
    torch.save(((), {name: inputs[name] for name in ("input_ids", "attention_mask")}), buffer)
    records["data/sample_inputs/model.pt"] = buffer.getvalue()


def code_in_a_shape_expression(records: Records, marker: Path) -> None:
    symbol = "Symbol('s43', positive=True, integer=True)"
    evil = f"Symbol('s43', positive={code(marker)}, integer=True)"
    records[PROGRAM] = records[PROGRAM].replace(symbol.encode(), evil.encode())


CRAFTS = [
    pickled_weight,
    pickled_constant,
    pickled_sample_inputs,
    pickled_legacy_weights,
    code_in_a_guard,
    code_in_a_shape_expression,
]


def read_records(data: bytes) -> Records:
    reader = PT2ArchiveReader(io.BytesIO(data))
    return {name: reader.read_bytes(name) for name in reader.get_file_names()}


def write_records(records: Records, path: Path) -> None:
    with PT2ArchiveWriter(str(path)) as writer:
        for name, data in records.items():
            if name not in (".data/version", ".data/serialization_id", "byteorder"):
                writer.write_bytes(name, data)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, bytes]:
    """An output folder as compress writes it (model, tokenizer, serving record) and the
    bytes of its model.pt2."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("safe") / "out"
    path = grainfx.save(compact("bert-sdpa"), folder / "model.pt2")
    BertTokenizerFast(vocab=VOCAB).backend_tokenizer.save(str(folder / "tokenizer.json"))
    serving = Serving("classification", ("neg", "pos"), 16, 0, "[PAD]")
    (folder / SERVING_FILE).write_text(serving.to_json())
    return folder, path.read_bytes()


@pytest.fixture(params=CRAFTS, ids=[craft.__name__ for craft in CRAFTS])
def crafted(request, saved, tmp_path) -> tuple[Path, Path]:
    """A copy of ``saved`` whose model.pt2 runs code through one loading path of torch, and
    the marker file that code writes; the test asserts first that torch's loader runs it."""
    folder, data = saved
    marker = tmp_path / "ran"
    records = read_records(data)
    request.param(records, marker)
    copy = tmp_path / "out"
    copy.mkdir()
    for name in ("tokenizer.json", SERVING_FILE):
        (copy / name).write_bytes((folder / name).read_bytes())
    write_records(records, copy / "model.pt2")
    try:
        module = torch.export.load(copy / "model.pt2").module()
        module(**example_inputs("bert-sdpa", 2, 8))
    except Exception:  # noqa: BLE001 (a crafted archive may break the load after it ran)
        pass
    assert marker.exists(), "the crafted archive runs nothing under torch.export.load"
    marker.unlink()
    return copy, marker


def test_grainfx_load_refuses_a_crafted_archive_and_runs_nothing(crafted):
    folder, marker = crafted
    for path in (folder, folder / "model.pt2"):
        with pytest.raises(UnsafeModelFileError, match="was refused unread"):
            grainfx.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["predict", "inspect", "bench"])
def test_the_cli_refuses_a_crafted_archive_and_runs_nothing(crafted, command, capsys, monkeypatch):
    folder, marker = crafted
    monkeypatch.setattr("sys.stdin", io.StringIO("good movie\n"))
    target = folder if command == "predict" else folder / "model.pt2"
    assert main([command, str(target)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"grainfx {command}: error: ") and stderr.count("\n") == 1, stderr
    assert "was refused unread" in stderr and "grainfx.resave" in stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, refused",
    [
        (lambda p: p["guards_code"].append("__import__('os').getpid() > 0"), "shape guard"),
        (lambda p: p["range_constraints"].update({"__import__('os')": {}}), "shape expression"),
        (lambda p: _nodes(p)[0].update(target="torch.os.system"), "calls 'torch.os.system'"),
        (lambda p: _nodes(p)[0].update(target="_operator.attrgetter"), "calls '_operator.attr"),
        (lambda p: _tensor_output(p).update(name='x"); y = ("'), "names a value"),
        (lambda p: _inputs(p)[0]["parameter"].update(parameter_name='a").b("'), "attribute"),
    ],
    ids=["guard", "range constraint", "call target", "operator", "value name", "attribute path"],
)
def test_code_in_the_program_is_refused(saved, edit, refused, tmp_path):
    """Strings that torch evaluates or pastes into generated source (grainfx.load gives the
    module inputs of the recorded shapes, so that its guards run as torch would run them)."""
    records = read_records(saved[1])
    _edit_json(records, PROGRAM, edit)
    write_records(records, tmp_path / "model.pt2")
    with pytest.raises(UnsafeModelFileError, match=refused):
        check_archive((tmp_path / "model.pt2").read_bytes(), "model.pt2")


def _nodes(program: dict) -> list[dict]:
    return program["graph_module"]["graph"]["nodes"]


def _tensor_output(program: dict) -> dict:
    outputs = (out for node in _nodes(program) for out in node["outputs"])
    return next(out["as_tensor"] for out in outputs if "as_tensor" in out)


def _inputs(program: dict) -> list[dict]:
    return program["graph_module"]["signature"]["input_specs"]


def test_what_save_writes_passes_the_check_and_loads(saved):
    folder, data = saved
    check_archive(data, "model.pt2")
    assert read_records(data)["data/sample_inputs/model.pt"] == b""
    assert grainfx.load(folder).predict(["good movie"])[0].label in ("neg", "pos")


def test_an_old_output_is_refused_then_loads_once_resaved(saved, tmp_path):
    """grainfx 0.2 wrote the sample inputs (plain tensors, pickled) into the archive."""
    folder, data = saved
    records = read_records(data)
    buffer = io.BytesIO()
    torch.save(((), {"input_ids": torch.ones(2, 3, dtype=torch.long)}), buffer)
    records["data/sample_inputs/model.pt"] = buffer.getvalue()
    old = tmp_path / "old.pt2"
    write_records(records, old)
    with pytest.raises(UnsafeModelFileError, match="pickled sample inputs"):
        grainfx.load(old)
    with pytest.raises(passes.LoadError, match="trust=True"):
        grainfx.resave(old)
    grainfx.resave(old, trust=True)
    module = grainfx.load(old)
    assert module.grainfx_kept.layers


def test_a_loaded_model_checks_its_input_shapes_as_before(saved):
    """The guards torch built from the pickled sample inputs are built from the record now."""
    module = grainfx.load(saved[0] / "model.pt2")
    module(**example_inputs("bert-sdpa", 2, 64))
    with pytest.raises(AssertionError, match=r"Guard failed: input_ids.size\(\)\[1\] <= 64"):
        module(**example_inputs("bert-sdpa", 2, 65))


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda r: r["inputs"]["input_ids"].update(dtype="load"), "an input dtype must be one of"),
        (lambda r: r["inputs"]["input_ids"].update(shape=[10**6, 10**6]), "larger than any"),
        (lambda r: r["layers"][0]["heads"][0].update(query=-1), "query must be an integer >= 0"),
        (lambda r: r.update(hidden="wide"), "hidden must be an integer"),
        (lambda r: r.update(version=99), "version 99 records are not known"),
        (lambda r: r.update(extra=1), "does not fit"),
    ],
    ids=["dtype", "huge input", "negative units", "hidden", "version", "unknown field"],
)
def test_a_damaged_structure_record_is_one_clear_error(saved, tmp_path, edit, problem):
    """The record inside the archive comes from the file too: checked field by field."""
    records = read_records(saved[1])
    _edit_json(records, "extra/grainfx_structure.json", edit)
    write_records(records, tmp_path / "model.pt2")
    with pytest.raises(passes.CorruptModelFileError, match=problem):
        grainfx.load(tmp_path / "model.pt2")
