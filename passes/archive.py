"""Check a ``.pt2`` archive before torch reads any of it: nothing pickled, nothing evaluated.

``torch.export.load`` runs code from a crafted archive in several ways: it unpickles weights and
constants marked ``use_pickle``, the sample inputs (falling back to ``weights_only=False``),
custom and opaque objects and the legacy formats; it loads AOTInductor shared libraries; and it
evaluates strings of the program itself: symbolic shape expressions (``sympy.sympify`` is
``eval``), shape guards (``exec``), call targets (any attribute path under ``torch``) and
attribute names (pasted into generated Python source). :func:`check_archive` accepts only the
members and the strings that :func:`passes.serialize.save` writes, read through torch's own zip
reader (so that the check and the load see the same members), and raises
:class:`~passes.errors.UnsafeModelFileError` naming the first thing it refuses.
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Iterator
from typing import Any

from torch.export.pt2_archive._package import PT2ArchiveReader

from passes.errors import CorruptModelFileError, UnsafeModelFileError

#: Members every archive has, holding plain text (versions, ids, the program as JSON).
FIXED_MEMBERS = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
}
SAMPLE_INPUTS = "data/sample_inputs/model.pt"  # pickled by torch: accepted only when empty
EXTRA_DIR = "extra/"
WEIGHT = re.compile(r"weight_\d+")
CONSTANT = re.compile(r"tensor_\d+")
EXTRA = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.json")

#: Call targets the compact graphs use: aten operators, Python's arithmetic on sizes and
#: ``getitem`` (not ``operator.call``, ``attrgetter`` or ``methodcaller``, which reach any
#: attribute), and math's functions.
OPERATORS = "add|sub|mul|truediv|floordiv|mod|pow|neg|eq|ne|lt|le|gt|ge|and_|or_|not_|getitem"
TARGET = re.compile(rf"torch\.ops\.aten\.\w+(\.\w+)?|_operator\.({OPERATORS})|math\.\w+")
IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
DOTTED = re.compile(r"[A-Za-z_]\w*(\.\w+)*")
#: Keys of the program whose string values name graph values, keyword arguments or module
#: attributes (pasted into the generated forward), and keys grainfx never writes (torchbind
#: classes, resolved and instantiated on load).
NAME_KEYS = {"name", "as_name"}
PATH_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name"}
FOREIGN_KEYS = {"class_fqn", "as_custom_obj", "custom_obj"}

#: What a symbolic shape expression (``Mul(Integer(32), Symbol('s53', positive=True))``, or
#: ``s53``) may hold: symbols, numbers, operators, sympy's classes and the functions torch's
#: deserializer names, the symbols' assumptions; nothing else reaches ``sympify``.
SYMBOL = re.compile(r"[a-z]+\d+")
ASSUMPTIONS = {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite"}
SYMPY_FUNCTIONS = {
    "Symbol",
    "Integer",
    "Rational",
    "Float",
    "Add",
    "Mul",
    "Pow",
    "FloorDiv",
    "ModularIndexing",
    "Where",
    "PythonMod",
    "Mod",
    "CleanDiv",
    "CeilToInt",
    "FloorToInt",
    "CeilDiv",
    "LShift",
    "RShift",
    "PowByNatural",
    "FloatPow",
    "FloatTrueDiv",
    "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat",
    "TruncToInt",
    "RoundToInt",
    "RoundDecimal",
    "ToFloat",
    "Identity",
    "Max",
    "Min",
    "Abs",
    "Eq",
    "Ne",
    "Lt",
    "Le",
    "Gt",
    "Ge",
    "And",
    "Or",
    "Not",
    "True",
    "False",
    "oo",
}
SYM_TOKEN = re.compile(
    r"\s+|\d+(\.\d+)?(e[-+]?\d+)?|'[a-z]+\d+'|[A-Za-z_]\w*|//|[<>=!]=|[-+*/%(),<>=]"
)

#: What a shape guard (``L['input_ids'].size()[1] <= 64``) may hold before torch ``exec``s it.
GUARD_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Call,
    ast.Subscript,
    ast.Attribute,
    ast.Name,
    ast.Constant,
    ast.Load,
    ast.boolop,
    ast.cmpop,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.FloorDiv,
    ast.Mod,
    ast.USub,
    ast.Not,
)
GUARD_NAMES = {"L", "math"} | SYMPY_FUNCTIONS
GUARD_ATTRIBUTES = {"size", "stride", "storage_offset", "isnan", "inf"}


def check_archive(data: bytes, where: str) -> None:
    """Refuse ``data`` (the bytes of a ``.pt2`` file) unless loading it can run nothing from it.

    ``where`` names the file in messages. Raises CorruptModelFileError when ``data`` is not an
    archive at all, UnsafeModelFileError for the first member or string that is not what grainfx
    writes.
    """
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = list(reader.get_file_names())
    except Exception as exc:
        raise CorruptModelFileError(
            f"{where} is not a readable .pt2 model ({type(exc).__name__}); it may be truncated "
            f"or written by something else: save it again with grainfx.save"
        ) from exc
    _check_members(reader, names, where)
    for config, pattern in (
        ("data/weights/model_weights_config.json", WEIGHT),
        ("data/constants/model_constants_config.json", CONSTANT),
    ):
        _check_payloads(_json(reader, config, where), pattern, set(names), config, where)
    _check_program(_json(reader, "models/model.json", where), where)


def _refuse(where: str, what: str) -> UnsafeModelFileError:
    return UnsafeModelFileError(
        f"{where} was refused unread: {what}. grainfx writes no such thing, and loading it could "
        f"run code from the file. Load only models you compressed; an output of grainfx 0.2 or "
        f"older you trust can be re-saved with grainfx.resave(PATH, trust=True)"
    )


def _check_members(reader: PT2ArchiveReader, names: list[str], where: str) -> None:
    if len(set(names)) != len(names):
        raise _refuse(where, "it holds a member name twice")
    for name in names:
        if name in FIXED_MEMBERS:
            continue
        if name == SAMPLE_INPUTS:
            if reader.archive_file.get_record_size(name):
                raise _refuse(where, f"its member {name} holds pickled sample inputs")
            continue
        folder, _, leaf = name.rpartition("/")
        if (
            (folder == "data/weights" and WEIGHT.fullmatch(leaf))
            or (folder == "data/constants" and CONSTANT.fullmatch(leaf))
            or (folder + "/" == EXTRA_DIR and EXTRA.fullmatch(leaf))
        ):
            continue
        raise _refuse(where, f"it holds a member {name!r}")
    missing = (FIXED_MEMBERS - {".data/serialization_id"}) - set(names)
    if missing:
        raise _refuse(where, f"it lacks the members {sorted(missing)}")


def _json(reader: PT2ArchiveReader, name: str, where: str) -> Any:
    try:
        return json.loads(reader.read_bytes(name))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _refuse(where, f"its member {name} is not JSON") from exc


def _check_payloads(
    config: Any, pattern: re.Pattern[str], names: set[str], member: str, where: str
) -> None:
    """Every weight or constant is a raw tensor file of the archive, none pickled."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(where, f"{member} is not a payload table")
    folder = member.rpartition("/")[0]
    for fqn, entry in entries.items():
        if not DOTTED.fullmatch(fqn):
            raise _refuse(where, f"{member} names a tensor {fqn!r}")
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise _refuse(where, f"{fqn} in {member} is pickled")
        path = entry.get("path_name")
        if not isinstance(path, str) or not pattern.fullmatch(path):
            raise _refuse(where, f"{fqn} in {member} is stored as {path!r}")
        if f"{folder}/{path}" not in names:
            raise _refuse(where, f"{fqn} in {member} points to a missing member {path}")


def _check_program(program: Any, where: str) -> None:
    """The program's strings that torch evaluates or pastes into source are plain."""
    if not isinstance(program, dict):
        raise _refuse(where, "its program is not a JSON object")
    for key, value in _items(program):
        if key in FOREIGN_KEYS:
            raise _refuse(where, f"its program holds a {key}")
        if not isinstance(value, str):
            continue
        if key == "target" and not TARGET.fullmatch(value):
            raise _refuse(where, f"its program calls {value!r}")
        if key in NAME_KEYS and not IDENTIFIER.fullmatch(value):
            raise _refuse(where, f"its program names a value {value!r}")
        if key in PATH_KEYS and not DOTTED.fullmatch(value):
            raise _refuse(where, f"its program names an attribute {value!r}")
        if key == "fqn" and value and not DOTTED.fullmatch(value):
            raise _refuse(where, f"its program names a module {value!r}")
        if key == "expr_str":
            _check_expression(value, where)
    constraints = program.get("range_constraints", {})
    if not isinstance(constraints, dict):
        raise _refuse(where, "its range constraints are not a table")
    for expression in constraints:
        _check_expression(expression, where)
    guards = program.get("guards_code", [])
    if not isinstance(guards, list):
        raise _refuse(where, "its shape guards are not a list")
    for guard in guards:
        _check_guard(guard, where)


def _items(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON tree; list items inherit their list's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _items(v, k)
    elif isinstance(node, list):
        for v in node:
            yield key, v
            yield from _items(v, key)


def _check_expression(text: str, where: str) -> None:
    position = 0
    while position < len(text):
        token = SYM_TOKEN.match(text, position)
        if token is None:
            raise _refuse(where, f"its shape expression {text!r} holds {text[position]!r}")
        word = token.group()
        if IDENTIFIER.fullmatch(word) and not (
            SYMBOL.fullmatch(word) or word in SYMPY_FUNCTIONS or word in ASSUMPTIONS
        ):
            raise _refuse(where, f"its shape expression {text!r} names {word!r}")
        position = token.end()


def _check_guard(guard: Any, where: str) -> None:
    if not isinstance(guard, str):
        raise _refuse(where, f"its shape guard {guard!r} is not text")
    try:
        tree = ast.parse(guard, mode="eval")
    except SyntaxError as exc:
        raise _refuse(where, f"its shape guard {guard!r} is not an expression") from exc
    for node in ast.walk(tree):
        plain = isinstance(node, GUARD_NODES) and not (
            (isinstance(node, ast.Name) and node.id not in GUARD_NAMES)
            or (isinstance(node, ast.Attribute) and node.attr not in GUARD_ATTRIBUTES)
            or (
                isinstance(node, ast.Constant)
                and not isinstance(node.value, (int, float))
                and not (isinstance(node.value, str) and IDENTIFIER.fullmatch(node.value))
            )
        )
        if not plain:
            raise _refuse(where, f"its shape guard {guard!r} holds {ast.unparse(node)!r}")
