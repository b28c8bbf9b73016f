"""grainfx.rows: CSV / JSONL rows read whole or refused in one line; labels as names or ids."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from grainfx.rows import DataError, Row, iter_rows, label_ids, read_rows

ENCODINGS = {
    "utf-8": b"",
    "utf-8-sig": codecs.BOM_UTF8,
    "utf-16-le": codecs.BOM_UTF16_LE,
    "utf-16-be": codecs.BOM_UTF16_BE,
}


def write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(ENCODINGS[encoding] + text.encode(encoding.replace("-sig", "")))
    return path


def test_csv_with_quotes_commas_line_breaks_and_a_bom(tmp_path):
    path = write(
        tmp_path / "d.csv",
        'label,text,extra\n1,"a, ""quoted"" text",x\n"pos","two\nlines",\n\n0,42,z\n',
        "utf-8-sig",
    )
    assert read_rows(path) == [
        Row('a, "quoted" text', "1", 2),
        Row("two\nlines", "pos", 3),
        Row("42", "0", 6),
    ]


def test_jsonl_and_a_json_array_in_utf16(tmp_path):
    lines = [{"text": "good", "label": 1}, {"text": "bad\u2028day", "label": "neg", "id": 3}]
    jsonl = write(tmp_path / "d.jsonl", "\n".join(map(json.dumps, lines)) + "\n\n", "utf-16-le")
    array = write(tmp_path / "d.json", json.dumps(lines, ensure_ascii=False, indent=1))
    expected = [("good", 1), ("bad\u2028day", "neg")]
    for path in (jsonl, array):
        assert [(r.text, r.label) for r in read_rows(path)] == expected


def test_labels_are_optional_when_asked(tmp_path):
    path = write(tmp_path / "d.csv", "text\nfine\n")
    assert read_rows(path, labels=False) == [Row("fine", None, 2)]
    with pytest.raises(DataError, match="no column 'label'"):
        read_rows(path)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("d.csv", 'text,label\n"a"b",1\n', "line 2 is not valid CSV"),
        ("d.csv", "text,label\nbad, film,1\n", "line 2 has 3 fields but the header has 2"),
        ("d.csv", "text,label,text\na,1,b\n", "names column 'text' 2 times"),
        ("d.csv", "text,label\n  ,1\n", "line 2: the text is empty"),
        ("d.csv", "", "holds no rows"),
        ("d.jsonl", '{"text": 12, "label": 1}\n', "the text is 12 (int), not a string"),
        ("d.jsonl", '{"text": "a", "label": 1.5}\n', "give a name (string) or an integer id"),
        ("d.jsonl", '{"text": "a", "label": true}\n', "give a name (string) or an integer id"),
        ("d.jsonl", '{"text": "a", "label": 1, "label": 2}\n', "names field 'label' twice"),
        ("d.jsonl", '["a", 1]\n', "is a JSON list, not an object"),
        ("d.json", '{"text": "a", "label": 1}\n[', "line 2 is not JSON"),
        ("d.tsv", "text\tlabel\n", "use a .csv or a .jsonl"),
    ],
)
def test_malformed_files_are_refused_in_one_line(tmp_path, name, content, message):
    with pytest.raises(DataError, match=re.escape(message)) as info:
        read_rows(write(tmp_path / name, content))
    assert "\n" not in str(info.value)


def test_encodings_other_than_utf_are_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncafé,1\n".encode("latin-1"))
    with pytest.raises(
        DataError,
        match=r"is not utf-8 text \(byte 0xe9 at offset 14\): save "
        r"it as UTF-8",
    ):
        read_rows(path)
    path.write_bytes("text,label\nab,1\n".encode("utf-16-le"))  # no BOM: NULs everywhere
    with pytest.raises(DataError, match="NUL character"):
        read_rows(path)


def test_label_ids_names_integers_and_the_models_own_names():
    assert label_ids(["pos", "neg", "pos"], 2) == ([1, 0, 1], ["neg", "pos"])
    assert label_ids([1, "0", " 1 "], 3) == ([1, 0, 1], ["0", "1", "2"])
    assert label_ids(["b"], 3) == ([0], ["b", "LABEL_1", "LABEL_2"])
    model = {"negative": 0, "positive": 1}
    assert label_ids(["positive", "negative"], 2, model) == ([1, 0], ["negative", "positive"])
    assert label_ids([0, 1], 2, model) == ([0, 1], ["negative", "positive"])
    default = {"LABEL_0": 0, "LABEL_1": 1}
    assert label_ids(["x", "y"], 2, default) == ([0, 1], ["x", "y"])


@pytest.mark.parametrize(
    "labels,label2id,message",
    [
        ([0, 2], None, r"labels \[2\] are outside the model's 2 classes \(0..1\)"),
        (["a", "b", "c"], None, r"3 label names \['a', 'b', 'c'\] but the model has 2 classes"),
        (
            ["pos", "meh"],
            {"neg": 0, "pos": 1},
            r"labels \['meh'\] are not among the model's label names \['neg', 'pos'\]",
        ),
    ],
)
def test_label_ids_refuses_what_the_model_cannot_take(labels, label2id, message):
    with pytest.raises(DataError, match=message):
        label_ids(labels, 2, label2id)


# -- random files -------------------------------------------------------------------------------

TEXTS = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=30),
    st.text(max_size=30),
    st.sampled_from(
        [
            "",
            " ",
            "7",
            "3.5",
            "a,b",
            'say "hi"',
            "x" * 70_000,
            "\ufeffbom",
            "é\n.",
            "\u2028",
            "null",
        ]
    ),
)
LABELS = st.one_of(
    st.sampled_from(["pos", "neg", "0", "1", " 1", 0, 1, 2]),
    st.sampled_from(["", "-3", 5, None, 1.5, True]),
)
#: A well-formed choice three times out of four, then the faults.
HEADERS = [["text", "label"]] * 6 + [
    ["label", "text"],
    ["text", "label", "id"],
    ["text"],
    ["text", "text", "label"],
    ["review", "label"],
]
CELLS = st.sampled_from([0, 0, 0, 0, 0, 0, -1, 1])


@st.composite
def random_file(draw):
    """(file name, bytes, the texts written): CSV or JSONL, in any encoding, with headers
    that may repeat, miss or add columns, rows that may miss or add cells, and values that
    are numbers, empty, huge or quoted."""
    kind = draw(st.sampled_from(["csv", "jsonl"]))
    header = draw(st.sampled_from(HEADERS))
    rows = draw(st.lists(st.tuples(TEXTS, LABELS, CELLS), min_size=1, max_size=4))
    if kind == "csv":
        buffer = io.StringIO()
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL] * 3 + ["raw"]))
        writer = csv.writer(buffer, quoting=quoting) if quoting != "raw" else None
        lines = [header]
        for text, label, cells in rows:
            values = {
                "text": text,
                "label": "" if label is None else str(label),
                "id": "1",
                "review": text,
            }
            line = [values[h] for h in header] + ["extra"] * max(cells, 0)
            lines.append(line[: len(line) + min(cells, 0)])
        for line in lines:
            if writer is None:
                buffer.write(",".join(line) + "\n")
            else:
                writer.writerow(line)
        content = buffer.getvalue()
    else:
        lines = []
        for text, label, cells in rows:
            text = draw(st.sampled_from([text] * 9 + [1, 2.5, None, ["a"]]))
            record = {h: text if h in ("text", "review") else label for h in header}
            if cells < 0:
                record.pop("label", None)
            lines.append(
                json.dumps(record)
                if "text" not in header[1:]
                else json.dumps(record)[:-1] + ', "text": "again"}'
            )
        content = "\n".join(lines)
    encoding = draw(
        st.sampled_from(
            ["utf-8"] * 4 + ["utf-8-sig", "utf-16-le", "utf-16-be", "latin-1", "bare-utf-16"]
        )
    )
    if encoding == "latin-1":
        data = content.encode("latin-1", errors="replace")
    elif encoding == "bare-utf-16":
        data = content.encode("utf-16-le")
    else:
        data = ENCODINGS[encoding] + content.encode(
            encoding.replace("-sig", ""), errors="surrogatepass"
        )
    return f"data.{kind}", data, [t for t, _, _ in rows]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_file())
def test_a_random_file_gives_its_rows_or_one_line_error(tmp_path_factory, spec):
    name, data, texts = spec
    path = tmp_path_factory.mktemp("random") / name
    path.write_bytes(data)
    try:
        rows = read_rows(path)
        ids, names = label_ids([r.label for r in rows], 3)
    except DataError as exc:
        message = str(exc)
        event(f"refused: {message.split(': ')[-1][:30]}")
        assert "\n" not in message and message.strip(), message
        assert str(path) in message or "label" in message
        return
    event("read")
    assert 0 < len(rows) <= len(texts)
    for row in rows:
        assert isinstance(row.text, str) and row.text.strip()
        assert isinstance(row.label, (str, int)) and not isinstance(row.label, bool)
    assert len(ids) == len(rows) and all(0 <= i < 3 for i in ids) and len(names) == 3


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(
                st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), min_size=1
            ).filter(str.strip),
            st.sampled_from(["pos", "neg", 0, 1]),
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from(["csv", "jsonl"]),
    st.sampled_from(list(ENCODINGS)),
)
def test_a_well_formed_file_reads_back_exactly(tmp_path_factory, rows, kind, encoding):
    path = tmp_path_factory.mktemp("exact") / f"data.{kind}"
    if kind == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([("text", "label"), *rows])
        content, expected = buffer.getvalue(), [(t, str(y)) for t, y in rows]
    else:
        content = "\n".join(json.dumps({"label": y, "text": t}) for t, y in rows)
        expected = rows
    write(path, content, encoding)
    assert [(r.text, r.label) for r in read_rows(path)] == expected


def _outcome(read, path, labels: bool):
    try:
        return list(read(path, labels=labels))
    except DataError as exc:
        return str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_file(), st.booleans())
def test_rows_read_one_at_a_time_are_the_rows_read_whole(tmp_path_factory, spec, labels):
    name, data, _ = spec
    path = tmp_path_factory.mktemp("stream") / name
    path.write_bytes(data)
    whole, streamed = _outcome(read_rows, path, labels), _outcome(iter_rows, path, labels)
    if isinstance(whole, list) or isinstance(streamed, list):
        assert streamed == whole
    else:  # both refuse: a file with two problems may name either first
        assert "\n" not in streamed and str(path) in streamed or "label" in streamed


def test_rows_are_read_as_they_are_taken(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\n" + "good,1\n" * 10 + "bad,\n")
    rows = iter_rows(path)
    assert next(rows) == Row("good", "1", 2)  # the bad last row is not reached yet
    with pytest.raises(DataError, match="line 12: label is missing"):
        list(rows)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"text": "good"}\n' * 5000 + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"is not utf-8 text \(byte 0xe9 at offset 85013\)"):
        list(iter_rows(latin, labels=False))
    with pytest.raises(DataError, match=r"is not utf-8 text \(byte 0xe9 at offset 85013\)"):
        read_rows(latin, labels=False)
