"""The grainfx console script, driven in a subprocess on a tiny model folder and CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

from grainfx.cli import main
from tests.fresh_process import run_without_transformers
from tests.grainfx.test_rows import random_file
from tests.models import build_bert

GRAINFX = Path(sys.executable).parent / "grainfx"
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "plot"]
VOCAB = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
#: What an output folder of compress holds: model, tokenizer, serving record, reports.
OUTPUT_FILES = [
    "grainfx.json",
    "model.json",
    "model.pt2",
    "report.json",
    "report.md",
    "structure.png",
    "tokenizer.json",
    "tokenizer_config.json",
]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(GRAINFX), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny fine-tuned-looking model folder (model + tokenizer) and a CSV of text/label."""
    return make_workdir(tmp_path_factory.mktemp("cli"))


def make_workdir(root: Path) -> Path:
    """``root`` with a tiny model folder ``model`` and 48 rows of text/label ``data.csv``."""
    from transformers import BertTokenizerFast

    model_dir = root / "model"
    model_dir.mkdir()
    BertTokenizerFast(vocab=VOCAB).save_pretrained(model_dir)
    # one spare embedding row (models pad theirs): a tokenizer with one more token still fits
    build_bert(vocab=len(VOCAB) + 1).save_pretrained(model_dir)
    rng = random.Random(0)
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(48):
            label = i % 2
            sentiment = WORDS[:3] if label else WORDS[3:6]
            writer.writerow([f"{rng.choice(WORDS[6:])} {rng.choice(sentiment)}", label])
    return root


def make_bad_models(root: Path) -> None:
    """Model folders in ``root`` that compress would get wrong: ``no-tokenizer`` (the model
    alone), ``no-head`` (a sequence classifier saved without its classifier weights),
    ``bare`` (a BertModel), ``token-classifier`` (a BertForTokenClassification),
    ``small-tokenizer`` (embeddings far more than the tokenizer's tokens) and
    ``large-tokenizer`` (tokens past the embeddings)."""
    import transformers
    from safetensors.torch import load_file, save_file

    model = build_bert(vocab=len(VOCAB))
    model.save_pretrained(root / "no-tokenizer")
    transformers.BertModel(model.config).save_pretrained(root / "bare")
    transformers.BertForTokenClassification(model.config).save_pretrained(root / "token-classifier")
    model.save_pretrained(root / "no-head")
    weights = root / "no-head" / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}
    save_file(state, weights, metadata={"format": "pt"})
    build_bert(vocab=4 * len(VOCAB)).save_pretrained(root / "small-tokenizer")
    build_bert(vocab=len(VOCAB) - 2).save_pretrained(root / "large-tokenizer")
    tokenizer = transformers.BertTokenizerFast(vocab=VOCAB)
    for name in ("no-head", "bare", "token-classifier", "small-tokenizer", "large-tokenizer"):
        tokenizer.save_pretrained(root / name)


@pytest.fixture(scope="module")
def bad_models(workdir) -> Path:
    make_bad_models(workdir)
    return workdir


@pytest.fixture(scope="module")
def compressed(workdir) -> Path:
    result = run(
        "compress",
        "model",
        "--data",
        "data.csv",
        "--sparsity",
        "0.8",
        "--out",
        "out",
        "--steps",
        "6",
        "--threads",
        "1",
        "--quiet",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student accuracy" in result.stdout
    return workdir / "out"


def test_compress_writes_model_structure_report_and_plot(compressed):
    assert sorted(p.name for p in compressed.iterdir()) == OUTPUT_FILES
    report = json.loads((compressed / "report.json").read_text())
    assert abs(report["density"] - 0.2) < 0.01
    assert "teacher_accuracy" in report and "student_accuracy" in report
    assert "| layer | heads |" in (compressed / "report.md").read_text()
    assert not list(compressed.parent.glob(".out.*")), "temporary folder left behind"


def test_inspect_prints_the_table_plot_and_graph(compressed, workdir):
    result = run(
        "inspect", "out/model.pt2", "--seq", "64", "--plot", "kept.png", "--graph", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "query units" in result.stdout and "GFLOPs per sequence of 64" in result.stdout
    assert "scaled_dot_product_attention" in result.stdout
    assert (workdir / "kept.png").stat().st_size > 1000
    as_json = run("inspect", "out/model.pt2", "--json", cwd=workdir)
    assert len(json.loads(as_json.stdout)) == 2


def test_bench_against_the_dense_model(compressed, workdir):
    result = run(
        "bench",
        "out/model.pt2",
        "--against",
        "model",
        "--batch",
        "2",
        "--seq",
        "8",
        "--reps",
        "2",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compact" in result.stdout and "x vs dense" in result.stdout


def test_existing_output_folder_is_not_overwritten(compressed, workdir):
    before = (compressed / "model.pt2").stat().st_mtime_ns
    result = run(
        "compress", "model", "--data", "data.csv", "--out", "out", "--steps", "2", cwd=workdir
    )
    assert result.returncode == 2
    assert "exists" in result.stderr and "--overwrite" in result.stderr
    assert (compressed / "model.pt2").stat().st_mtime_ns == before


#: Small bad files for the table below: (name, bytes).
BAD_FILES = {
    "nolabel.csv": b"text,label\nnice film,1\nbad plot,\n",
    "data.txt": b"text,label\nnice film,1\n",
    "three.csv": b"text,label\ngood,a\nbad,b\nmeh,c\n",
    "outside.csv": b"text,label\ngood,1\nbad,5\n",
    "emptytext.csv": b"text,label\ngood,1\n   ,0\n",
    "comma.csv": b"text,label\ngood,1\nbad, awful plot,0\n",
    "twotext.csv": b"text,label,text\ngood,1,x\n",
    "latin1.csv": "text,label\ncafé film,1\n".encode("latin-1"),
    "nul.csv": "text,label\ngood,1\n".encode("utf-16-le"),
    "empty.csv": b"",
    "header.csv": b"text,label\n",
    "quote.csv": b'text,label\n"good" film",1\n',
    "number.jsonl": b'{"text": "good", "label": 1}\n{"text": 42, "label": 0}\n',
    "broken.jsonl": b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n',
    "field.jsonl": b'{"review": "good", "label": 1}\n',
    "twice.jsonl": b'{"text": "good", "label": 1, "label": 0}\n',
    "float.jsonl": b'{"text": "good", "label": 0.5}\n',
    "list.jsonl": b'["good", 1]\n',
}


def run_here(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """``grainfx ARGS`` in this process (no interpreter start-up): exit status, stdout,
    stderr. An exception escaping ``main`` fails the calling test."""
    monkeypatch.chdir(cwd)
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("missing file", ["model", "--data", "absent.csv"], "absent.csv does not exist"),
        (
            "wrong columns",
            ["model", "--data", "data.csv", "--text-column", "review"],
            "no column 'review'",
        ),
        ("labels missing", ["model", "--data", "nolabel.csv"], "line 3: label is missing"),
        ("sparsity", ["model", "--data", "data.csv", "--sparsity", "1.2"], "--sparsity must be in"),
        ("not a model", ["data_dir", "--data", "data.csv"], "not a model folder"),
        (
            "nothing to resume",
            ["model", "--data", "data.csv", "--resume"],
            "nothing-to-resume.checkpoint.pt to resume from: run without resume",
        ),
        (
            "bad learning rate",
            ["model", "--data", "data.csv", "--learning-rate", "-1"],
            "learning_rate must be a number > 0",
        ),
        ("no model or data", ["--data", "data.csv"], "give MODEL_DIR and --data FILE (or --demo)"),
        (
            "missing eval file",
            ["model", "--data", "data.csv", "--eval-data", "gone.jsonl"],
            "gone.jsonl does not exist",
        ),
        ("text file", ["model", "--data", "data.txt"], "use a .csv or a .jsonl"),
        (
            "more names than classes",
            ["model", "--data", "three.csv"],
            "3 label names ['a', 'b', 'c'] but the model has 2 classes",
        ),
        (
            "id outside the classes",
            ["model", "--data", "outside.csv"],
            "labels [5] are outside the model's 2 classes (0..1)",
        ),
        ("empty text", ["model", "--data", "emptytext.csv"], "line 3: the text is empty"),
        (
            "unquoted comma",
            ["model", "--data", "comma.csv"],
            "line 3 has 3 fields but the header has 2: quote texts that hold commas",
        ),
        (
            "duplicate header",
            ["model", "--data", "twotext.csv"],
            "the header names column 'text' 2 times: rename the extra ones",
        ),
        ("latin-1", ["model", "--data", "latin1.csv"], "is not utf-8 text (byte 0xe9"),
        ("utf-16 without bom", ["model", "--data", "nul.csv"], "holds a NUL character"),
        ("empty csv", ["model", "--data", "empty.csv"], "holds no rows"),
        ("header only", ["model", "--data", "header.csv"], "header.csv holds no rows"),
        ("bad quoting", ["model", "--data", "quote.csv"], "line 2 is not valid CSV"),
        (
            "number as text",
            ["model", "--data", "number.jsonl"],
            "line 2: the text is 42 (int), not a string: write texts as JSON strings",
        ),
        ("broken json", ["model", "--data", "broken.jsonl"], "line 2 is not JSON"),
        (
            "missing field",
            ["model", "--data", "field.jsonl"],
            "line 1 has no field 'text' (its fields: ['label', 'review'])",
        ),
        ("repeated key", ["model", "--data", "twice.jsonl"], "names field 'label' twice"),
        (
            "fractional label",
            ["model", "--data", "float.jsonl"],
            "the label 0.5 is a float; give a name (string) or an integer id",
        ),
        ("json list row", ["model", "--data", "list.jsonl"], "is a JSON list, not an object"),
        (
            "out under a file",
            ["model", "--data", "data.csv", "--out", "data.csv/out"],
            "data.csv is a file, not a folder; choose another --out",
        ),
        (
            "checkpoint under a file",
            ["model", "--data", "data.csv", "--checkpoint", "data.csv/run.pt"],
            "cannot write the checkpoint data.csv/run.pt",
        ),
        (
            "batch size",
            ["model", "--data", "data.csv", "--batch-size", "0"],
            "--batch-size must be an integer >= 1, got 0",
        ),
        (
            "eval split",
            ["model", "--data", "data.csv", "--eval-split", "1.5"],
            "--eval-split must be in [0, 1)",
        ),
        ("unknown task", ["model", "--data", "data.csv", "--task", "ner"], "unknown --task 'ner'"),
        (
            "ema beta",
            ["model", "--data", "data.csv", "--ema-beta", "fast"],
            "ema_beta must be a number in [0, 1) or 'auto', got 'fast'",
        ),
        (
            "latency shape",
            ["model", "--data", "data.csv", "--latency-aware", "--latency-shape", "8by128"],
            "--latency-shape must be BATCHxSEQUENCE, e.g. 8x128, got '8by128'",
        ),
        (
            "latency shape size",
            ["model", "--data", "data.csv", "--latency-aware", "--latency-shape", "8x0"],
            "latency_shape must be (batch, sequence), two ints >= 1, got (8, 0)",
        ),
        (
            "data is a folder",
            ["model", "--data", "data_dir"],
            "data_dir is a folder: give a .csv or a .jsonl file",
        ),
        (
            "no tokenizer",
            ["no-tokenizer", "--data", "data.csv"],
            "no-tokenizer holds no tokenizer (no tokenizer.json, tokenizer_config.json or "
            "vocabulary file): save the model's tokenizer into that folder too",
        ),
        (
            "random head",
            ["no-head", "--data", "data.csv"],
            "no-head has no weights for classifier.bias, classifier.weight: loaded as a "
            "sequence classifier, they would start at random",
        ),
        (
            "bare model",
            ["bare", "--data", "data.csv"],
            "bare holds a bare model without a task head (BertModel), not a sequence "
            "classifier (--task classification): fine-tune it with the task's head",
        ),
        (
            "token classifier",
            ["token-classifier", "--data", "data.csv"],
            "token-classifier holds a token classifier (BertForTokenClassification), not a "
            "sequence classifier (--task classification): grainfx compress has no --task for "
            "it (only classification, causal-lm); compress it from Python with grainfx.compress",
        ),
        (
            "classifier as a causal lm",
            ["model", "--data", "data.txt", "--task", "causal-lm"],
            "holds a sequence classifier (BertForSequenceClassification), not a causal "
            "language model (--task causal-lm): pass --task classification",
        ),
        (
            "small tokenizer",
            ["small-tokenizer", "--data", "data.csv"],
            "the tokenizer in small-tokenizer has 15 tokens but the model's embeddings have "
            "60 rows: it is not this model's tokenizer",
        ),
        (
            "large tokenizer",
            ["large-tokenizer", "--data", "data.csv"],
            "the tokenizer in large-tokenizer has 15 tokens but the model's embeddings have "
            "13 rows",
        ),
        (
            "out is the model",
            ["model", "--data", "data.csv", "--out", "model"],
            "--out model is the model folder model: choose an --out outside it",
        ),
        (
            "out is the model overwrite",
            ["model", "--data", "data.csv", "--out", "model", "--overwrite"],
            "--out model is the model folder model: choose an --out outside it",
        ),
        (
            "out inside the model",
            ["model", "--data", "data.csv", "--out", "model/out", "--overwrite"],
            "--out model/out lies inside the model folder model: choose an --out outside it",
        ),
        (
            "out holds the model",
            ["model", "--data", "data.csv", "--out", ".", "--overwrite"],
            "--out . holds the model folder model: choose an --out outside it",
        ),
        (
            "out is the data folder",
            ["model", "--data", "data_dir/rows.csv", "--out", "data_dir", "--overwrite"],
            "--out data_dir is the folder of the --data file data_dir/rows.csv: choose an "
            "--out that holds no data file",
        ),
        (
            "out is the eval data folder",
            [
                "model",
                "--data",
                "data.csv",
                "--eval-data",
                "data_dir/rows.csv",
                "--out",
                "data_dir",
            ],
            "--out data_dir is the folder of the --eval-data file data_dir/rows.csv",
        ),
    ],
)
@pytest.mark.usefixtures("bad_models")
def test_bad_inputs_get_one_clear_line(workdir, case, args, message, monkeypatch, capsys):
    (workdir / "data_dir").mkdir(exist_ok=True)
    shutil.copy(workdir / "data.csv", workdir / "data_dir" / "rows.csv")
    for name, content in BAD_FILES.items():
        (workdir / name).write_bytes(content)
    out = f"bad-{case.replace(' ', '-')}"
    before = set(os.listdir(workdir))
    code, _, stderr = run_here(
        ["compress", "--out", out, "--steps", "1", "--threads", "1", "--quiet", *args],
        workdir,
        monkeypatch,
        capsys,
    )
    assert code == 2, stderr
    assert message in stderr
    assert stderr.startswith("grainfx compress: error: ") and stderr.count("\n") == 1, stderr
    assert set(os.listdir(workdir)) == before, "a failed run left files behind"


def _contents(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "out,data", [("model", "data.csv"), ("model/out", "data.csv"), ("moved", "moved/rows.csv")]
)
def test_an_out_over_the_model_or_the_data_leaves_both_untouched(
    workdir, out, data, monkeypatch, capsys
):
    """--out on the model folder or a data file's folder, with --overwrite: refused before
    anything is read or written; the model and the data are as they were."""
    (workdir / "moved").mkdir(exist_ok=True)
    shutil.copy(workdir / "data.csv", workdir / "moved" / "rows.csv")
    before = _contents(workdir / "model", workdir / "moved"), set(os.listdir(workdir))
    code, _, err = run_here(
        ["compress", "model", "--data", data, "--out", out, "--overwrite", "--steps", "1"],
        workdir,
        monkeypatch,
        capsys,
    )
    assert code == 2 and err.startswith("grainfx compress: error: --out ") and err.count("\n") == 1
    assert (_contents(workdir / "model", workdir / "moved"), set(os.listdir(workdir))) == before


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(workdir, monkeypatch, capsys):
    """While a run writes --out, another on it (however spelled) is refused at once, naming
    the first one's pid; a lock that a kill -9 leaves is taken over by the next run."""
    common = ["model", "--data", "data.csv", "--threads", "1", "--quiet"]
    lock = workdir / ".busy.lock"
    first = subprocess.Popen(
        [str(GRAINFX), "compress", *common, "--out", "busy", "--steps", "100000"]
        + ["--checkpoint-every", "1000000"],
        cwd=workdir,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline:
            if lock.is_file() and lock.read_text().strip():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        before = set(os.listdir(workdir))
        for out in ("busy", f"{workdir}/busy", "model/../busy"):
            code, _, err = run_here(
                ["compress", *common, "--out", out, "--overwrite", "--check"],
                workdir,
                monkeypatch,
                capsys,
            )
            assert code == 2, err
            assert err == (
                f"grainfx compress: error: --out {out} is being written by another grainfx "
                f"run (process {first.pid}): wait for it to end, or choose another --out\n"
            )
            assert set(os.listdir(workdir)) == before and lock.read_text() == f"{first.pid}\n"
    finally:
        first.kill()
        first.wait(timeout=60)
        first.stderr.close()
    assert lock.exists()  # what the kill -9 leaves: the next run takes it over
    code, out, err = run_here(
        ["compress", *common, "--out", "busy", "--check"], workdir, monkeypatch, capsys
    )
    assert code == 0 and "preflight passed" in out, err
    assert not lock.exists() and not (workdir / "busy").exists()
    (workdir / "busy.checkpoint.pt").unlink(missing_ok=True)


def test_an_output_is_written_when_only_the_final_checkpoint_cannot_be(workdir):
    """A file-size limit the final checkpoint (weights and optimizer state) exceeds but the
    output's files do not: a warning, and the output all the same."""
    out = workdir / "fsize"
    result = subprocess.run(
        [str(GRAINFX), "compress", "model", "--data", "data.csv", "--sparsity", "0.8"]
        + ["--out", "fsize", "--steps", "2", "--threads", "1", "--quiet"],
        cwd=workdir,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(320_000),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "cannot write the final checkpoint fsize.checkpoint.pt (File too large): the result "
        "is kept without it" in result.stderr
    ), result.stderr
    assert "wrote fsize/" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    left = [p.name for p in workdir.iterdir() if "fsize" in p.name and p != out]
    assert left == [], left


def test_inspect_of_a_foreign_file(workdir):
    (workdir / "foreign.pt2").write_text("not a model")
    result = run("inspect", "foreign.pt2", cwd=workdir)
    assert result.returncode == 2 and "grainfx.save" in result.stderr


def test_resume_after_ctrl_c_gives_the_uninterrupted_result(workdir):
    import passes

    common = [
        "compress",
        "model",
        "--data",
        "data.csv",
        "--sparsity",
        "0.8",
        "--steps",
        "300",
        "--threads",
        "1",
        "--quiet",
        "--checkpoint-every",
        "5",
    ]
    whole = run(*common, "--out", "whole", cwd=workdir)
    assert whole.returncode == 0, whole.stderr[-2000:]
    checkpoint = workdir / "part.checkpoint.pt"
    child = subprocess.Popen(
        [str(GRAINFX), *common, "--out", "part"],
        cwd=workdir,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 130, stderr[-2000:]
    assert "run the same command with --resume" in stderr
    assert not (workdir / "part").exists()
    resumed = run(*common, "--out", "part", "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not checkpoint.exists(), "the checkpoint of a finished run is removed"
    a = passes.load(workdir / "whole" / "model.pt2").state_dict()
    b = passes.load(workdir / "part" / "model.pt2").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reports = [
        json.loads((workdir / name / "report.json").read_text()) for name in ("whole", "part")
    ]
    assert reports[0]["layers"] == reports[1]["layers"]
    assert reports[0]["kd_loss"] == reports[1]["kd_loss"]


# -- causal language models ---------------------------------------------------------------------

LM_WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "and", "then", "slept"]


@pytest.fixture(scope="module", params=["gpt2-sdpa", "llama-sdpa"])
def lm_workdir(tmp_path_factory, request) -> Path:
    """A tiny LM folder (GPT-2, or Llama with RoPE, GQA and SwiGLU) with a word-level
    tokenizer, training documents as plain text and held-out documents as JSONL (text under
    "body")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.models import VOCAB as EMBEDDING_ROWS
    from tests.models import build

    root = tmp_path_factory.mktemp("cli-lm")
    words = ["<pad>", "<unk>", "<eos>"] + LM_WORDS
    # unused tokens up to the model's embedding rows, as in a real vocabulary
    words += [f"<unused{i}>" for i in range(EMBEDDING_ROWS - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=inner,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(root / "model")
    build(request.param).save_pretrained(root / "model")
    rng = random.Random(0)

    def document() -> str:
        return " ".join(rng.choice(LM_WORDS) for _ in range(rng.randint(3, 12)))

    (root / "train.txt").write_text("\n".join(document() for _ in range(40)) + "\n\n")
    (root / "eval.jsonl").write_text(
        "".join(json.dumps({"body": document(), "id": i}) + "\n" for i in range(12))
    )
    return root


@pytest.fixture(scope="module")
def lm_compressed(lm_workdir) -> tuple[Path, subprocess.CompletedProcess]:
    result = run(
        "compress",
        "model",
        "--task",
        "causal-lm",
        "--data",
        "train.txt",
        "--eval-data",
        "eval.jsonl",
        "--text-column",
        "body",
        "--sparsity",
        "0.5",
        "--batch-size",
        "8",
        "--steps",
        "6",
        "--out",
        "out",
        "--threads",
        "1",
        "--quiet",
        cwd=lm_workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return lm_workdir / "out", result


def test_compress_causal_lm_reports_held_out_perplexity(lm_compressed):
    import passes

    out, result = lm_compressed
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm"
    # pruning stops at the first density <= the target; this tiny Llama's units are coarse
    # (a key/value group takes its K and V rows along), so the last one can land below it
    assert 0.45 <= report["density"] <= 0.5
    for who in ("teacher", "student"):
        value = report[f"{who}_perplexity"]
        assert 1 < value < float("inf")
        assert f"{who} perplexity: {value:.2f}" in result.stdout
        assert f"- {who} perplexity: {value:.2f}" in (out / "report.md").read_text()
    module = passes.load(out / "model.pt2")
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    with torch.no_grad():
        logits = module(input_ids=ids, attention_mask=(ids != 0).long())["logits"]
    assert logits.shape == (2, 4, 100) and torch.isfinite(logits).all()


def test_inspect_and_bench_of_a_causal_lm(lm_compressed, lm_workdir):
    inspected = run("inspect", "out/model.pt2", "--seq", "32", cwd=lm_workdir)
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert "query units" in inspected.stdout and "GFLOPs per sequence of 32" in inspected.stdout
    bench = run(
        "bench",
        "out/model.pt2",
        "--against",
        "model",
        "--batch",
        "2",
        "--seq",
        "8",
        "--reps",
        "2",
        cwd=lm_workdir,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "compact" in bench.stdout and "x vs dense" in bench.stdout


@pytest.mark.parametrize(
    "case,args,message",
    [
        (
            "missing file",
            ["--task", "causal-lm", "--data", "absent.txt"],
            "absent.txt does not exist",
        ),
        ("empty file", ["--task", "causal-lm", "--data", "empty.txt"], "empty.txt holds no text"),
        (
            "no text column",
            ["--task", "causal-lm", "--data", "eval.jsonl"],
            "line 1 has no field 'text' (its fields: ['body', 'id'])",
        ),
        (
            "unknown task",
            ["--task", "translation", "--data", "train.txt"],
            "unknown --task 'translation': use one of classification, causal-lm",
        ),
    ],
)
def test_causal_lm_bad_inputs_get_one_clear_line(lm_workdir, case, args, message):
    (lm_workdir / "empty.txt").write_text("\n\n")
    out = f"bad-{case.replace(' ', '-')}"
    result = run("compress", "model", *args, "--out", out, "--steps", "1", cwd=lm_workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (lm_workdir / out).exists()


# -- preflight, output folder, predict ------------------------------------------------------------


def test_output_folder_has_the_permissions_of_the_users_umask(compressed):
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(compressed.stat().st_mode) == 0o777 & ~mask
    for path in compressed.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name


def test_output_folder_records_labels_and_maximum_length(compressed):
    serving = json.loads((compressed / "grainfx.json").read_text())
    # --max-length 128 (the default) is cut to the tiny model's 64 positions
    assert serving["labels"] == ["0", "1"] and serving["max_length"] == 64
    assert serving["task"] == "classification" and serving["pad_token"] == "[PAD]"


def test_predict_prints_label_names_scores_and_accuracy(compressed, workdir, monkeypatch, capsys):
    code, out, err = run_here(
        ["predict", "out", "--data", "data.csv"], workdir, monkeypatch, capsys
    )
    assert code == 0, err
    with open(workdir / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [line.split("\t") for line in out.splitlines()]
    assert [text for _, _, text in lines] == [r["text"] for r in rows]
    assert all(label in ("0", "1") and 0.5 <= float(score) <= 1 for label, score, _ in lines)
    correct = sum(label == r["label"] for (label, _, _), r in zip(lines, rows, strict=True))
    assert err == f"accuracy: {correct / len(rows):.2%} ({correct} of {len(rows)} rows)\n"
    code, _, err = run_here(
        ["predict", "out", "--data", "data.csv", "--out", "p.jsonl"], workdir, monkeypatch, capsys
    )
    records = [json.loads(line) for line in (workdir / "p.jsonl").read_text().splitlines()]
    assert [(r["label"], f"{r['score']:.4f}") for r in records] == [(a, b) for a, b, _ in lines]
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in records)


def test_predict_reads_text_lines_on_stdin(compressed, workdir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("good film\n\nthe plot awful\n"))
    code, out, err = run_here(["predict", "out"], workdir, monkeypatch, capsys)
    assert code == 0 and err == "", err
    assert [line.split("\t")[2] for line in out.splitlines()] == ["good film", "the plot awful"]


#: grainfx.json changes of the edited-NAME folders of the predict table: fields, or the text.
SERVING_EDITS: dict[str, dict | str] = {
    "huge-max-length": {"max_length": 10**40},
    "negative-max-length": {"max_length": -3},
    "text-max-length": {"max_length": "64"},
    "max-length-past-positions": {"max_length": 65},
    "negative-pad-id": {"pad_id": -1},
    "fractional-pad-id": {"pad_id": 0.5},
    "pad-id-past-vocabulary": {"pad_id": 10**6},
    "pad-id-of-another-token": {"pad_id": 3},
    "unknown-pad-token": {"pad_token": "[NOPE]"},
    "number-pad-token": {"pad_token": 7},
    "text-labels": {"labels": "01"},
    "repeated-labels": {"labels": ["a", "a"]},
    "one-label": {"labels": ["a"]},
    "number-task": {"task": 5},
    "side": {"truncation_side": "up"},
    "list-record": "[1, 2]",
    "deep-record": "[" * 100_000 + "]" * 100_000,
    "huge-record": " " * (65 * 2**20) + "{}",
}


@pytest.mark.parametrize(
    "args,message",
    [
        (["nowhere"], "nowhere is not a folder: pass the --out folder of grainfx compress"),
        (["model"], "model has no model.pt2: pass a folder written by grainfx compress"),
        (
            ["out", "--data", "three.csv"],
            "line 2: label 'a' is not one of the model's labels ['0', '1'] nor an id 0..1",
        ),
        (
            ["out", "--data", "data.csv", "--out", "p.txt"],
            "write predictions to a .csv or a .jsonl",
        ),
        (
            ["out", "--data", "data.csv", "--out", "nowhere/p.csv"],
            "cannot write nowhere/p.csv (No such file or directory): choose another --out",
        ),
        (
            ["out", "--data", "three.csv", "--out", "p.csv"],
            "line 2: label 'a' is not one of the model's labels",
        ),
        # hand-edited grainfx.json records (SERVING_EDITS): one line each, not a traceback
        (["edited-huge-max-length"], "max_length must be an integer in 1..1000000, got 10000"),
        (["edited-negative-max-length"], "max_length must be an integer in 1..1000000, got -3"),
        (["edited-text-max-length"], "max_length must be an integer in 1..1000000, got '64'"),
        (["edited-max-length-past-positions"], "max_length 65 is more than the model's 64 pos"),
        (["edited-negative-pad-id"], "pad_id must be an integer >= 0, got -1"),
        (["edited-fractional-pad-id"], "pad_id must be an integer >= 0, got 0.5"),
        (
            ["edited-pad-id-past-vocabulary"],
            "pad_id 1000000 is outside the tokenizer's vocabulary (ids 0..14)",
        ),
        (["edited-pad-id-of-another-token"], "pad_token '[PAD]' is id 0, but pad_id is 3"),
        (["edited-unknown-pad-token"], "pad_token '[NOPE]' is not in the tokenizer's vocabulary"),
        (["edited-number-pad-token"], "pad_token must be a token (a string), got 7"),
        (["edited-text-labels"], "labels must be a list of names, got '01'"),
        (["edited-repeated-labels"], "labels must be distinct names, got 'a' twice"),
        (["edited-one-label"], "the model gives 2 classes but grainfx.json names 1"),
        (["edited-number-task"], "task must be one of ('classification', 'causal-lm'), got 5"),
        (["edited-side"], "padding and truncation sides are 'right' or 'left', got 'up'"),
        (["edited-list-record"], "(a JSON list, not an object)"),
        (["edited-deep-record"], "(maximum recursion depth exceeded"),
        (["edited-huge-record"], "more than a record holds"),
    ],
)
def test_predict_bad_inputs_get_one_clear_line(
    compressed, workdir, args, message, monkeypatch, capsys
):
    (workdir / "three.csv").write_bytes(BAD_FILES["three.csv"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("good film\n"))
    for name, change in SERVING_EDITS.items():
        folder = workdir / f"edited-{name}"
        if not folder.exists():
            shutil.copytree(compressed, folder)
            record = json.loads((compressed / "grainfx.json").read_text())
            text = change if isinstance(change, str) else json.dumps({**record, **change})
            (folder / "grainfx.json").write_text(text)
    code, _, err = run_here(["predict", *args], workdir, monkeypatch, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not list(workdir.glob(".p.*.partial")), "a failed run left its output behind"


def test_too_little_disk_space_is_refused_before_anything_runs(workdir, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=50_000))
    code, _, err = run_here(
        ["compress", "model", "--data", "data.csv", "--out", "full", "--threads", "1"],
        workdir,
        monkeypatch,
        capsys,
    )
    assert code == 2, err
    assert re.search(
        r"not enough free disk space in \S+: 48.8 KB free, about \d+\.\d KB needed "
        r"for the output and a checkpoint; free some space or choose another "
        r"--out / --checkpoint",
        err,
    ), err
    assert not (workdir / "full").exists()


def test_check_runs_the_preflight_alone(workdir, monkeypatch, capsys):
    code, out, err = run_here(
        [
            "compress",
            "model",
            "--data",
            "data.csv",
            "--out",
            "checked",
            "--check",
            "--threads",
            "1",
        ],
        workdir,
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "preflight passed" in out and "2 attention and 2 FFN blocks" in out
    assert not (workdir / "checked").exists()
    assert not (workdir / "checked.checkpoint.pt").exists()


@pytest.mark.parametrize("folder", ["no-tokenizer", "no-head", "bare", "token-classifier"])
def test_check_refuses_a_model_it_would_compress_wrongly(bad_models, folder, monkeypatch, capsys):
    code, out, err = run_here(
        ["compress", folder, "--data", "data.csv", "--out", "checked", "--check"],
        bad_models,
        monkeypatch,
        capsys,
    )
    assert code == 2 and out == "", err
    assert err.startswith(f"grainfx compress: error: {folder} ") and err.count("\n") == 1, err
    assert not (bad_models / "checked").exists()


def test_a_new_head_is_refused_in_one_line_of_a_process_of_its_own(bad_models):
    """Where transformers' load report (a table of the missing weights) would show too."""
    result = run(
        "compress", "no-head", "--data", "data.csv", "--out", "checked", "--check", cwd=bad_models
    )
    assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
    assert result.stderr.startswith("grainfx compress: error: no-head has no weights for")
    assert result.stderr.count("\n") == 1, result.stderr


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@example(("data.csv", b"text,label\ngood film,pos\nbad plot,neg\n", ["good film", "bad plot"]))
@given(spec=random_file())
def test_a_random_data_file_gives_a_preflight_pass_or_one_line(workdir, monkeypatch, capsys, spec):
    name, data, _ = spec
    folder = workdir / "random"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / name).write_bytes(data)
    code, out, err = run_here(
        [
            "compress",
            "../model",
            "--data",
            name,
            "--out",
            "out",
            "--check",
            "--threads",
            "1",
            "--quiet",
        ],
        folder,
        monkeypatch,
        capsys,
    )
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("grainfx compress: error: ") and err.count("\n") == 1, err
    else:
        assert "preflight passed" in out, out
    assert os.listdir(folder) == [name], "the preflight left files behind"


# -- faults: kill -9, a full disk, resuming with other inputs -----------------------------------


def _whole_checkpoint(path: Path) -> int:
    """The steps done in the checkpoint at ``path``, which must load whole."""
    state = torch.load(path, weights_only=True)
    assert state["format"] == "grainfx-checkpoint"
    return state["steps_done"]


def _kill_when(command: list[str], cwd: Path, ready, delay: float = 0.0) -> None:
    """Start ``grainfx COMMAND``, wait for ``ready()``, wait ``delay`` s more, then kill -9."""
    child = subprocess.Popen(
        [str(GRAINFX), *command],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not ready() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    assert child.poll() is None, f"finished before the kill: {child.stderr.read()[-2000:]}"
    child.kill()
    child.wait(timeout=60)
    child.stderr.close()


def _limit_file_size(limit: int):
    """For a child process: files larger than ``limit`` bytes cannot be written (EFBIG),
    as on a full disk."""

    def limit_it():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_it


def test_kill_9_full_disk_and_other_inputs_never_break_the_output(
    workdir, compressed, monkeypatch, capsys
):
    """Over a previous output (--overwrite): kill -9 mid-training, then mid-save; resume on
    other data or another tokenizer (refused, naming what changed); resume on a disk too
    full for model.pt2 (a clear error); resume for good. The previous output stays whole
    until the new one replaces it."""
    rng = random.Random(14)
    out, checkpoint = workdir / "kill", workdir / "kill.checkpoint.pt"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(compressed, out)
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    with open(workdir / "named.csv", "w", newline="") as f:  # labels as names this time
        csv.writer(f).writerows(
            [("label", "text")]
            + [
                ("pos" if r["label"] == "1" else "neg", r["text"])
                for r in csv.DictReader(io.StringIO((workdir / "data.csv").read_text()))
            ]
        )
    common = [
        "compress",
        "model",
        "--data",
        "named.csv",
        "--sparsity",
        "0.8",
        "--steps",
        "60",
        "--threads",
        "1",
        "--quiet",
        "--checkpoint-every",
        "4",
        "--out",
        "kill",
        "--overwrite",
    ]

    def unchanged() -> bool:
        return {p.name: p.read_bytes() for p in out.iterdir()} == previous

    _kill_when(common, workdir, checkpoint.exists, delay=rng.uniform(0.0, 0.6))
    assert 4 <= _whole_checkpoint(checkpoint) < 60 and unchanged()

    def writing() -> bool:  # the output's temporary folder is there
        return any(p.is_dir() for p in workdir.glob(".kill.*"))

    _kill_when(common + ["--resume"], workdir, writing, delay=rng.uniform(0.0, 0.3))
    assert _whole_checkpoint(checkpoint) == 60 and unchanged()

    (workdir / "other.csv").write_text((workdir / "named.csv").read_text() + "neg,bad\n")
    other = [a if a != "named.csv" else "other.csv" for a in common]
    for check in ([], ["--check"]):
        code, _, err = run_here(other + ["--resume", *check], workdir, monkeypatch, capsys)
        assert code == 2 and "written by a run on other inputs (--data file changed:" in err, err
    shutil.copytree(workdir / "model", workdir / "model2", dirs_exist_ok=True)
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab={**VOCAB, "extra": len(VOCAB)}).save_pretrained(workdir / "model2")
    code, _, err = run_here(
        ["compress", "model2", *common[2:], "--resume"], workdir, monkeypatch, capsys
    )
    assert code == 2 and "other inputs (tokenizer changed: tokenizer: sha256:" in err, err

    full = subprocess.run(
        [str(GRAINFX), *common, "--resume"],
        cwd=workdir,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(100_000),
    )
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.startswith(
        "grainfx compress: error: cannot write the output kill (File too large): free disk "
        "space or choose another --out, then run the same command with --resume"
    ), full.stderr
    assert full.stderr.count("\n") == 1 and unchanged() and _whole_checkpoint(checkpoint) == 60

    code, _, err = run_here(common + ["--resume"], workdir, monkeypatch, capsys)
    assert code == 0, err
    assert not checkpoint.exists() and not writing()
    assert json.loads((out / "grainfx.json").read_text())["labels"] == ["neg", "pos"]
    assert json.loads((out / "report.json").read_text())["steps"] == 60
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES and not unchanged()


# -- the output folder, loaded on its own -------------------------------------------------------

TEXTS = ["good film", "the plot awful", " ".join(WORDS * 30), "unknown words only", "great"]


def test_load_of_the_folder_tokenizes_like_the_model_tokenizer_and_predicts(compressed, workdir):
    from transformers import AutoTokenizer

    import grainfx
    import passes

    predictor = grainfx.load(compressed)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    expected = tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    encoded = predictor.encode(TEXTS)
    assert encoded["input_ids"].shape == (5, 64)  # the long text is cut at the model's 64
    for name, value in encoded.items():
        assert torch.equal(value, expected[name]), name
    with torch.no_grad():
        logits = passes.load(compressed / "model.pt2")(**expected)["logits"]
    predictions = predictor(TEXTS)
    assert [p.label for p in predictions] == [str(i) for i in logits.argmax(-1).tolist()]
    probabilities = logits.softmax(-1)
    for p, row in zip(predictions, probabilities, strict=True):
        assert abs(p.score - row.max().item()) < 1e-6
        assert list(p.scores) == ["0", "1"] and abs(p.scores["1"] - row[1].item()) < 1e-6
    alone = predictor("good film")  # unpadded: equal up to float rounding
    assert alone.label == predictions[0].label and abs(alone.score - predictions[0].score) < 1e-5
    assert torch.equal(predictor(**expected)["logits"], logits)


def test_the_folder_serves_where_transformers_cannot_be_imported(compressed):
    import grainfx

    with torch.no_grad():
        expected = [(p.label, p.score) for p in grainfx.load(compressed)(TEXTS)]
    result = run_without_transformers(
        f"""
        import json
        import grainfx
        model = grainfx.load({str(compressed)!r})
        ids = model.encode(["good film"])
        logits = model(**ids)["logits"]
        print(json.dumps({{"predictions": [(p.label, p.score) for p in model({TEXTS!r})],
                          "shape": list(logits.shape), "labels": list(model.labels)}}))
        """,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.splitlines()[-1])
    assert served["labels"] == ["0", "1"] and served["shape"] == [1, 2]
    assert [label for label, _ in served["predictions"]] == [label for label, _ in expected]
    assert all(
        abs(a[1] - b[1]) < 1e-6 for a, b in zip(served["predictions"], expected, strict=True)
    )


def test_a_causal_lm_folder_gives_logits_on_text(lm_compressed, lm_workdir, monkeypatch, capsys):
    from transformers import AutoTokenizer

    import grainfx
    import passes

    out, _ = lm_compressed
    model = grainfx.load(out)
    texts = ["the cat sat on a mat", "a dog ran"]
    tokenizer = AutoTokenizer.from_pretrained(lm_workdir / "model")
    expected = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = passes.load(out / "model.pt2")(**expected)["logits"]
    assert torch.equal(model(texts)["logits"], logits)
    assert model("a dog ran")["logits"].shape == (1, 3, 100)
    code, _, err = run_here(["predict", "out"], lm_workdir, monkeypatch, capsys)
    assert code == 2 and "holds a causal-lm model: predict gives the labels of a classifier" in err


# -- bounded memory: a huge line, a stream of lines, bad --plot paths -----------------------------

#: A wrapper that runs a command and prints its seconds and peak RSS (KB), its output dropped.
PEAK = (
    "import resource, subprocess, sys, time; start = time.perf_counter(); "
    "code = subprocess.run(sys.argv[2:], stdin=open(sys.argv[1]), stdout=subprocess.DEVNULL,"
    " stderr=subprocess.PIPE, text=True); "
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
    "print(code.returncode, time.perf_counter() - start, rss, code.stderr[-500:])"
)


def peak(args: list[str], cwd: Path, stdin: str = "/dev/null") -> tuple[float, int]:
    """(seconds, peak RSS in KB) of ``grainfx ARGS`` run in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK, stdin, str(GRAINFX), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    code, seconds, rss, err = (result.stdout + " ").split(" ", 3)
    assert code == "0", err + result.stderr[-2000:]
    return float(seconds), int(rss)


def test_a_10_mb_line_costs_about_what_a_normal_line_does(compressed, workdir):
    """compress --check and predict tokenize only what max_length tokens need (on main a 10
    MB line took 3 minutes and 2 GB to check, and 1.8 GB to predict)."""
    huge = " ".join(WORDS[i % 10] for i in range(2_000_000))  # 10 MB, one line
    (workdir / "huge.csv").write_text((workdir / "data.csv").read_text() + f"{huge},1\n")
    (workdir / "huge.txt").write_text(f"good film\n{huge}\nbad plot\n")
    (workdir / "one.txt").write_text("good film\n")
    check = ["compress", "model", "--out", "huge-check", "--check", "--threads", "1", "--quiet"]
    normal, big = (
        peak([*check, "--data", "data.csv"], workdir),
        peak([*check, "--data", "huge.csv"], workdir),
    )
    assert big[0] < 3 * normal[0] + 20 and big[1] < normal[1] + 300_000, (normal, big)
    normal, big = (
        peak(["predict", "out"], workdir, "one.txt"),
        peak(["predict", "out"], workdir, "huge.txt"),
    )
    assert big[0] < 3 * normal[0] + 20 and big[1] < normal[1] + 300_000, (normal, big)


def test_predict_prints_each_batch_before_the_input_ends(compressed, workdir):
    import select

    process = subprocess.Popen(
        [str(GRAINFX), "predict", "out", "--batch-size", "2"],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("good film\nthe plot awful\n")
        process.stdin.flush()  # stdin stays open: more lines could come
        ready, _, _ = select.select([process.stdout], [], [], 300)
        assert ready, "nothing printed while stdin is open"
        assert process.stdout.readline().endswith("\tgood film\n")
        assert process.stdout.readline().endswith("\tthe plot awful\n")
        process.stdin.write("bad movie\n")
        process.stdin.close()
        assert process.stdout.read().endswith("\tbad movie\n")
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    "plot,message",
    [
        ("kept.txt", "--plot kept.txt: give an image file name ending in .png or another format"),
        ("kept", "--plot kept: give an image file name ending in .png"),
        ("no-folder/kept.png", "the folder no-folder does not exist; create it or choose another"),
        ("data.csv/kept.png", "data.csv is a file, not a folder; choose another --plot"),
        ("read-only/kept.png", "read-only is not writable (Permission denied); choose another"),
        ("out", "--plot out is a folder: give an image file, e.g. out/kept.png"),
    ],
)
def test_inspect_bad_plot_paths_get_one_clear_line(
    compressed, workdir, plot, message, monkeypatch, capsys
):
    import tempfile

    (workdir / "read-only").mkdir(exist_ok=True)
    (workdir / "read-only").chmod(0o555)
    if os.geteuid() == 0:  # root writes into a read-only folder: make the probe fail as it
        real = tempfile.mkstemp

        def refused(*args, dir=None, **kwargs):
            if Path(dir).name == "read-only":
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refused)
    code, out, err = run_here(
        ["inspect", "out/model.pt2", "--plot", plot], workdir, monkeypatch, capsys
    )
    assert code == 2 and out == "", out
    assert err.startswith("grainfx inspect: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert list((workdir / "read-only").iterdir()) == []
