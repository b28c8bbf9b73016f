"""Labelled text rows from CSV / JSON Lines files, and the mapping of labels to class ids.

Reading needs the standard library only (``grainfx predict`` uses it without transformers).
Every problem is a :class:`DataError` whose message is one line naming the file, the line and
the fix: :func:`read_rows` reads a file completely before anything is trained;
:func:`iter_rows` gives the same rows one at a time (``grainfx predict``: memory flat in the
number of rows).

- Encodings: UTF-8 (with or without a byte-order mark) and UTF-16 with a byte-order mark.
- CSV: a header row; quoted fields may hold commas and line breaks; a row with more or fewer
  fields than the header is refused (an unquoted comma in a text is the usual cause).
- JSON Lines (``.jsonl``, or ``.json`` holding one object a line or one array of objects):
  texts must be JSON strings (a number where a text belongs is refused, not converted);
  labels are JSON strings (names) or integers.
- Labels are names or integer ids (:func:`label_ids`).
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import itertools
import json
import re
import sys
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: A label is a name (str) or a class id (int).
Label = str | int
INTEGER = re.compile(r"[+-]?\d+")
SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json"}


class DataError(ValueError):
    """A data file, or its labels, that rows cannot be read from (one-line message)."""


@dataclass(frozen=True)
class Row:
    """One example: its text, its label (``None`` when the file has no label column) and the
    line of the file it starts on (for messages)."""

    text: str
    label: Label | None
    line: int


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not {encoding.replace('-sig', '')} text (byte "
            f"0x{data[exc.start]:02x} at offset {exc.start}): save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise DataError(
            f"{path} holds a NUL character (offset {text.index(chr(0))}): it is "
            f"binary or in an encoding other than UTF-8 / UTF-16 with a BOM; save "
            f"it as UTF-8 text"
        )
    return text


def read_rows(
    path: str | Path, text_column: str = "text", label_column: str = "label", labels: bool = True
) -> list[Row]:
    """The rows of a ``.csv`` / ``.jsonl`` / ``.json`` file, in file order.

    ``labels``: every row must have a label; with ``labels=False`` the label column is
    optional (rows get ``label=None`` when the file has none), as for prediction.

    Raises:
        DataError: a missing or unreadable file, an unknown suffix, a missing or repeated
            column, a malformed row, an empty text or label, or no rows at all.
    """
    path = Path(path)
    kind = _kind(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}): check its permissions") from None
    text = _decode(path, data)
    if kind == "csv":
        rows = list(
            _csv_rows(path, io.StringIO(text, newline=""), text_column, label_column, labels)
        )
    else:
        rows = _json_rows(path, text, text_column, label_column, labels)
    if not rows:
        raise DataError(_no_rows(path, kind))
    return rows


def iter_rows(
    path: str | Path, text_column: str = "text", label_column: str = "label", labels: bool = True
) -> Iterator[Row]:
    """The rows of :func:`read_rows`, one at a time, read from the file as they are taken:
    memory is that of one row, whatever the number of rows (a ``.json`` array alone is read
    whole). A problem is raised when its row is reached, so rows before it have been given.

    Raises:
        DataError: as :func:`read_rows`.
    """
    path = Path(path)
    kind = _kind(path)
    lines = _stream_lines(path, "" if kind == "csv" else "\n")
    if kind == "csv":
        rows = _csv_rows(path, lines, text_column, label_column, labels)
    else:
        numbered = enumerate(lines, 1)
        first = next(((n, line) for n, line in numbered if line.strip()), None)
        if first is None:
            rows = iter(())
        elif path.suffix.lower() == ".json" and first[1].lstrip().startswith("["):
            lines.close()
            rows = iter(read_rows(path, text_column, label_column, labels))
        else:
            again = itertools.chain([first], numbered)
            rows = _object_rows(path, _json_lines(path, again), text_column, label_column, labels)
    empty = True
    for row in rows:
        empty = False
        yield row
    lines.close()
    if empty:
        raise DataError(_no_rows(path, kind))


def _kind(path: Path) -> str:
    """``"csv"`` or ``"json"``: the kind of an existing data file."""
    if path.is_dir():
        raise DataError(f"{path} is a folder: give a .csv or a .jsonl file")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: use a .csv or a .jsonl (JSON Lines) file")
    return kind


def _no_rows(path: Path, kind: str) -> str:
    return (
        f"{path} holds no rows: give a file with a header and at least one row of text"
        if kind == "csv"
        else f"{path} holds no rows: give one JSON object a line"
    )


def _stream_lines(path: Path, newline: str) -> Generator[str, None, None]:
    """The lines of the file at ``path`` (line ends kept; ``newline`` as for ``open``),
    decoded as :func:`_decode` does, a block at a time."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}): check its permissions") from None
    start = f.read(3)
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, skip = "utf-16", 0
    else:
        encoding, skip = "utf-8", 3 if start == codecs.BOM_UTF8 else 0
    f.seek(skip)
    with io.TextIOWrapper(f, encoding=encoding, newline=newline) as text:
        offset = 0
        try:
            for line in text:
                if "\x00" in line:
                    raise DataError(
                        f"{path} holds a NUL character (offset "
                        f"{offset + line.index(chr(0))}): it is binary or in an encoding "
                        f"other than UTF-8 / UTF-16 with a BOM; save it as UTF-8 text"
                    )
                offset += len(line)
                yield line
        except UnicodeDecodeError:
            raise _decode_error(path, encoding, skip) from None


def _decode_error(path: Path, encoding: str, skip: int) -> DataError:
    """The DataError of :func:`_decode` for a file that does not decode: its first bad byte,
    found reading the file again a block at a time."""
    decoder = codecs.getincrementaldecoder(encoding)()
    with open(path, "rb") as f:
        f.seek(skip)
        position, final = skip, False
        while not final:
            block = f.read(1 << 16)
            final = not block
            try:
                decoder.decode(block, final)
            except UnicodeDecodeError as exc:
                at = position - (len(exc.object) - len(block)) + exc.start
                return DataError(
                    f"{path} is not {encoding} text (byte 0x{exc.object[exc.start]:02x} at "
                    f"offset {at}): save it as UTF-8"
                )
            position += len(block)
    return DataError(f"{path} is not {encoding} text: save it as UTF-8")


def _row(path: Path, line: int, text: object, label: object, label_column: str | None) -> Row:
    """A checked row: a non-empty string text and, when the file has labels, a label."""
    if not isinstance(text, str):
        what = "null" if text is None else f"{json.dumps(text)[:20]} ({type(text).__name__})"
        raise DataError(
            f"{path} line {line}: the text is {what}, not a string: write texts "
            f"as JSON strings (in quotes)"
        )
    if not text.strip():
        raise DataError(f"{path} line {line}: the text is empty; remove the row or give it a text")
    if label_column is None:
        return Row(text, None, line)
    if isinstance(label, str):
        label = label.strip()
    if label is None or label == "":
        raise DataError(
            f"{path} line {line}: label is missing; every row needs a text and a "
            f"label (a name or an integer id) in column {label_column!r}"
        )
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(
            f"{path} line {line}: the label {label!r:.20} is a "
            f"{type(label).__name__}; give a name (string) or an integer id"
        )
    return Row(text, label, line)


def _columns(
    path: Path, found: Sequence[str], text_column: str, label_column: str, labels: bool
) -> str | None:
    """The label column to read (``None`` when optional and absent); refuses missing or
    repeated text / label columns."""
    for column in (text_column, label_column):
        if list(found).count(column) > 1:
            raise DataError(
                f"{path}: the header names column {column!r} "
                f"{list(found).count(column)} times: rename the extra ones"
            )
    needed = [(text_column, "--text-column")]
    if labels:
        needed.append((label_column, "--label-column"))
    for column, option in needed:
        if column not in found:
            raise DataError(
                f"{path} has no column {column!r} (columns: {list(found)}); name it with {option}"
            )
    return label_column if label_column in found else None


def _csv_rows(
    path: Path, lines: Iterable[str], text_column: str, label_column: str, labels: bool
) -> Iterator[Row]:
    """The rows of CSV ``lines`` (line ends kept, as ``open(..., newline="")`` gives them)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # a long text is a text (tokenization truncates it)
    try:
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            label_at = _columns(path, header, text_column, label_column, labels)
            t, y = header.index(text_column), header.index(label_at) if label_at else None
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields:
                    continue  # a blank line
                if len(fields) != len(header):
                    raise DataError(
                        f"{path} line {line} has {len(fields)} fields but the header has "
                        f'{len(header)}: quote texts that hold commas ("like, this") and '
                        f"give every row the header's columns"
                    )
                yield _row(path, line, fields[t], fields[y] if y is not None else None, label_at)
        except csv.Error as exc:
            raise DataError(
                f"{path} line {reader.line_num} is not valid CSV ({exc}): quote "
                f"fields that hold quotes, commas or line breaks"
            ) from None
    finally:
        csv.field_size_limit(limit)


def _object(path: Path, line: int, pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise DataError(f"{path} line {line} names field {repeated[0]!r} twice: keep one")
    return dict(pairs)


def _json_rows(
    path: Path, text: str, text_column: str, label_column: str, labels: bool
) -> list[Row]:
    lines = [
        (number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()
    ]  # not splitlines: JSON strings may hold U+2028
    if path.suffix.lower() == ".json" and lines and lines[0][1].lstrip().startswith("["):
        objects: Iterable[tuple[int, object]] = _json_array(path, text)
    else:
        objects = _json_lines(path, lines)
    return list(_object_rows(path, objects, text_column, label_column, labels))


def _json_lines(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON Lines file."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=functools.partial(_object, path, number))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number} is not JSON ({exc.msg}): a .jsonl file "
                f"holds one JSON object a line"
            ) from None
        yield number, value


def _object_rows(
    path: Path,
    objects: Iterable[tuple[int, object]],
    text_column: str,
    label_column: str,
    labels: bool,
) -> Iterator[Row]:
    """The rows of (line number, JSON value) pairs; without ``labels`` the label field is read
    when the first object has it."""
    label_at: str | None = label_column if labels else None
    for index, (number, value) in enumerate(objects):
        if index == 0 and not labels and isinstance(value, dict) and label_column in value:
            label_at = label_column
        if not isinstance(value, dict):
            raise DataError(
                f"{path} line {number} is a JSON {type(value).__name__}, not an "
                f"object with a {text_column!r} field"
            )
        for column, option in ((text_column, "--text-column"), (label_at, "--label-column")):
            if column is not None and column not in value:
                raise DataError(
                    f"{path} line {number} has no field {column!r} (its fields: "
                    f"{sorted(value)}); name the field with {option}"
                )
        yield _row(
            path, number, value[text_column], value.get(label_at) if label_at else None, label_at
        )


def _json_array(path: Path, text: str) -> list[tuple[int, object]]:
    try:
        value = json.loads(text, object_pairs_hook=lambda p: _object(path, 1, p))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} line {exc.lineno} is not JSON ({exc.msg}): give a JSON array "
            f"of objects or one object a line (.jsonl)"
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"{path} is a JSON {type(value).__name__}: give an array of objects "
            f"or one object a line (.jsonl)"
        )
    return [(i + 1, item) for i, item in enumerate(value)]


def _default_names(label2id: Mapping[str, int] | None, classes: int) -> bool:
    return not label2id or dict(label2id) == {f"LABEL_{i}": i for i in range(classes)}


def label_ids(
    labels: Sequence[Label], classes: int, label2id: Mapping[str, int] | None = None
) -> tuple[list[int], list[str]]:
    """(class id of each label, the name of each class id) for a model of ``classes``
    classes.

    Labels that are all names of a non-default ``label2id`` (the model's
    ``config.label2id``) map through it; labels that are all integers (``3`` or ``"3"``) are
    class ids; other names, when the model names its classes only ``LABEL_0``,
    ``LABEL_1``..., take ids in sorted order. The class names are the model's own, the
    sorted names (then ``LABEL_<i>`` for classes no row names), or the ids as text.

    Raises:
        DataError: an id outside ``0 .. classes - 1``, a name the model does not have, or
            more names than classes.
    """
    texts = [str(label).strip() for label in labels]
    named = not _default_names(label2id, classes)
    label2id = label2id or {}  # no names, as for None (named is False then)
    if named:
        by_id = {int(i): name for name, i in label2id.items()}
        names = [by_id.get(i, f"LABEL_{i}") for i in range(classes)]
        if all(t in label2id for t in texts):
            return [int(label2id[t]) for t in texts], names
    if all(isinstance(x, int) or INTEGER.fullmatch(t) for x, t in zip(labels, texts, strict=True)):
        ids = [int(t) for t in texts]
        outside = sorted({i for i in ids if not 0 <= i < classes})
        if outside:
            raise DataError(
                f"labels {outside} are outside the model's {classes} classes "
                f"(0..{classes - 1}): give ids in that range or label names"
            )
        return ids, names if named else [str(i) for i in range(classes)]
    if named:
        unknown = sorted({t for t in texts if t not in label2id})
        raise DataError(
            f"labels {unknown[:5]} are not among the model's label names "
            f"{list(label2id)} (config.label2id): use those names or ids "
            f"0..{classes - 1}"
        )
    distinct = sorted(set(texts))
    if len(distinct) > classes:
        raise DataError(
            f"{len(distinct)} label names {distinct[:6]} but the model has "
            f"{classes} classes: give a model with {len(distinct)} labels "
            f"(num_labels) or fewer names"
        )
    index = {name: i for i, name in enumerate(distinct)}
    return [index[t] for t in texts], distinct + [
        f"LABEL_{i}" for i in range(len(distinct), classes)
    ]
