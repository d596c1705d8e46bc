"""What a .pt2 archive (torch.export.save) must look like before torch.export.load may see it.

torch.export.load trusts its input. It unpickles with weights_only=False: weights and constants
whose payload config says use_pickle, constants named custom_obj_* / opaque_obj_*, legacy
data/weights/<model>.pt and data/constants/<model>.pt files, and sample inputs that the safe
loader refuses. It loads compiled libraries from data/aotinductor/. It evaluates the program's
symbolic shapes with sympy.sympify, which runs Python. And it writes Python source from the
program's names, guards and input specs and exec()s it (the GraphModule's code, and
ExportedProgram.module()'s input guards and signature).

So the archive is read once into memory and checked against what torch.export.save writes for an
ordinary program, and only those same bytes go to torch.export.load. The checks:

- zip structure: one root folder; members stored uncompressed (as torch writes them), so a
  declared size is a size actually present in the file; no duplicate names, also ignoring case
  (torch's zip reader looks names up case-insensitively); torch's own zip reader must list the
  same members with the same sizes, and the documents below are read through it;
- members: an allowlist (`_MEMBER_PATTERNS`); pickled objects, legacy .pt files, compiled code
  and a second program are refused by name;
- payload configs: use_pickle false, tensor_* constants only, and every tensor view fits the
  bytes stored for it (an empty record would otherwise become torch.zeros of any size);
- sample inputs: must load with torch.load(weights_only=True), or torch would retry unsafely;
- the program document: every string is checked for what torch does with it (`_check_program`).

Everything outside that is refused with an error naming what was found. cdlcodec never unpickles.
"""
from __future__ import annotations

import ast
import io
import json
import keyword
import pickle
import re
import zipfile

# Sizes checked before anything is read or parsed; far above what ordinary programs need.
MAX_MEMBERS = 1 << 20
MAX_DOCUMENT_BYTES = 512 << 20   # models/model.json and the payload configs
MAX_JSON_DEPTH = 512
MAX_NAME_CHARS = 4096
MAX_TEXT_CHARS = 1 << 20         # stack traces and other free text
MAX_EXPR_CHARS = 1 << 16
MAX_EXPR_DEPTH = 64
MAX_INT_MAGNITUDE = 1 << 64
MAX_SYMBOL_INDEX_DIGITS = 6      # torch loops up to the largest unbacked-symbol index it finds

PROGRAM = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"

_MEMBER_PATTERNS = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"version", r"\.data/version",
    r"\.data/serialization_id", re.escape(PROGRAM), re.escape(WEIGHTS_CONFIG), r"data/weights/weight_\d{1,9}",
    re.escape(CONSTANTS_CONFIG), r"data/constants/tensor_\d{1,9}", re.escape(SAMPLE_INPUTS),
    r"extra/[A-Za-z0-9_.\-]{1,255}(?:/[A-Za-z0-9_.\-]{1,255})*",
)]
_NEVER_UNPICKLES = "cdlcodec never unpickles"
_NEVER_EVALUATES = "cdlcodec never evaluates code from a model file"


class Pt2Refusal(Exception):
    """Why an archive is refused; check_pt2_archive turns it into the caller's error type."""


def check_pt2_archive(data: bytes, what: str, error: type[Exception]) -> None:
    """Raise `error` ("<what>: refused: <reason>") unless `data` is an archive torch.export.load may read."""
    try:
        _check(data)
    except Pt2Refusal as refusal:
        raise error(f"{what}: refused: {refusal}") from None


def _member_reason(name: str) -> str:
    """Why a member outside the allowlist is refused; the dangerous kinds by name."""
    if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
        return (f"the archive holds compiled code ({name}); cdlcodec never loads native code "
                "from a model file")
    if re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", name):
        return f"the archive holds pickled data (legacy file {name}); {_NEVER_UNPICKLES}"
    if re.fullmatch(r"data/constants/(custom_obj|opaque_obj)_\d+", name):
        return f"the archive holds pickled objects ({name}); {_NEVER_UNPICKLES}"
    if name.startswith("models/"):
        return f"the archive holds a second program ({name}); only models/model.json is read"
    return (f"unexpected member {name!r} (a program saved by torch.export.save holds only its "
            "program, weights, constants, sample inputs and extra files)")


def _check(data: bytes) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises several types for damaged directories
        from .torch_checkpoint import short_text

        raise Pt2Refusal(f"not a zip archive ({type(exc).__name__}: {short_text(str(exc))})") from None
    if not infos:
        raise Pt2Refusal("the zip archive is empty")
    if len(infos) > MAX_MEMBERS:
        raise Pt2Refusal(f"{len(infos)} members (limit {MAX_MEMBERS})")
    root = infos[0].filename.split("/", 1)[0]
    if not root or not root.isprintable() or "\\" in root:
        raise Pt2Refusal(f"bad root folder name {root!r}")
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    for info in infos:
        full = info.filename
        if not full.startswith(root + "/"):
            raise Pt2Refusal(f"member {full!r} lies outside the archive folder {root!r}/")
        name = full[len(root) + 1:]
        if full.casefold() in seen:
            raise Pt2Refusal(f"member {name!r} appears twice (names are compared ignoring case)")
        seen.add(full.casefold())
        if not any(p.fullmatch(name) for p in _MEMBER_PATTERNS):
            raise Pt2Refusal(_member_reason(name))
        if info.flag_bits & 0x1:
            raise Pt2Refusal(f"member {name!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise Pt2Refusal(f"member {name!r} is compressed (torch.export.save stores members uncompressed)")
        if info.header_offset + info.compress_size > len(data):
            raise Pt2Refusal(f"member {name!r} extends past the end of the file")
        sizes[name] = info.file_size
    if PROGRAM not in sizes:
        raise Pt2Refusal(f"no {PROGRAM} (not a program saved by torch.export.save)")
    reader = _torch_reader(data, sizes)
    _check_payload_config(reader, sizes, WEIGHTS_CONFIG, "data/weights/", r"weight_\d+")
    _check_payload_config(reader, sizes, CONSTANTS_CONFIG, "data/constants/", r"tensor_\d+")
    if SAMPLE_INPUTS in sizes:
        _check_sample_inputs(reader.get_record(SAMPLE_INPUTS))
    _check_program(_read_json(reader, sizes, PROGRAM))


def _torch_reader(data: bytes, sizes: dict[str, int]):
    """torch's zip reader over the same bytes; it must see exactly the members zipfile saw."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        listed = reader.get_all_records()
        mismatch = sorted(set(listed) ^ set(sizes)) or [n for n in listed if reader.get_record_size(n) != sizes[n]]
    except RuntimeError as exc:
        raise Pt2Refusal(f"torch cannot read the zip archive ({str(exc).splitlines()[0][:200]})") from None
    if mismatch or len(listed) != len(sizes):
        raise Pt2Refusal(f"torch's zip reader sees other members or sizes than Python's ({_show(mismatch[:3])})")
    return reader


def _read_json(reader, sizes: dict[str, int], name: str):
    if sizes[name] > MAX_DOCUMENT_BYTES:
        raise Pt2Refusal(f"{name} is {sizes[name]} bytes (limit {MAX_DOCUMENT_BYTES})")
    try:
        return json.loads(reader.get_record(name).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise Pt2Refusal(f"{name} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


# ------------------------------------------------------------------------------- payload configs

def _element_size(code) -> int | None:
    """Bytes per element of a serialized dtype code, from the table torch's deserializer uses."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(code) if type(code) is int else None
    return dtype.itemsize if dtype is not None else None


def _check_payload_config(reader, sizes: dict[str, int], config_name: str, folder: str, pattern: str) -> None:
    if config_name not in sizes:
        return  # torch reports the missing file itself
    doc = _read_json(reader, sizes, config_name)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise Pt2Refusal(f"{config_name} has no 'config' mapping")
    for fqn, meta in config.items():
        _plain_name(fqn, f"{config_name} entry name")
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise Pt2Refusal(f"{config_name}: entry {fqn!r} is malformed")
        member = folder + meta["path_name"]
        if meta.get("use_pickle") is not False:
            raise Pt2Refusal(f"the archive holds pickled data ({member} marked use_pickle); {_NEVER_UNPICKLES}")
        if not re.fullmatch(pattern, meta["path_name"]):
            if re.fullmatch(r"(custom_obj|opaque_obj)_\d+", meta["path_name"]):
                raise Pt2Refusal(f"the archive holds pickled objects ({member}); {_NEVER_UNPICKLES}")
            raise Pt2Refusal(f"{config_name}: entry {fqn!r} points at {member!r}, which is not a raw tensor payload")
        if member not in sizes:
            raise Pt2Refusal(f"{config_name}: entry {fqn!r} points at {member!r}, which the archive lacks")
        _check_tensor_view(meta.get("tensor_meta"), sizes[member], f"{fqn!r} ({member})")


def _concrete(value, what: str) -> int:
    if not (isinstance(value, dict) and len(value) == 1 and type(value.get("as_int")) is int
            and 0 <= value["as_int"] < MAX_INT_MAGNITUDE):
        raise Pt2Refusal(f"tensor {what} has a size, stride or offset that is not a plain non-negative integer")
    return value["as_int"]


def _check_tensor_view(meta, stored: int, what: str) -> None:
    """The strided view torch builds over a stored record must lie inside the record's bytes."""
    if not isinstance(meta, dict):
        raise Pt2Refusal(f"tensor {what} has no tensor_meta")
    from torch._export.serde.schema import Layout

    element = _element_size(meta.get("dtype"))
    if element is None:
        raise Pt2Refusal(f"tensor {what} has unknown dtype {meta.get('dtype')!r}")
    if meta.get("layout") != Layout.Strided:
        raise Pt2Refusal(f"tensor {what} is not a strided (dense) tensor (layout {meta.get('layout')!r})")
    shape, strides = meta.get("sizes"), meta.get("strides")
    if not isinstance(shape, list) or not isinstance(strides, list) or len(shape) != len(strides) or len(shape) > 64:
        raise Pt2Refusal(f"tensor {what} has malformed sizes/strides")
    shape = [_concrete(v, what) for v in shape]
    strides = [_concrete(v, what) for v in strides]
    offset = _concrete(meta.get("storage_offset"), what)
    if 0 in shape:
        return
    needed = (offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * element
    if needed > stored:
        raise Pt2Refusal(f"tensor {what} needs {needed} bytes but {stored} are stored")


def _check_sample_inputs(data: bytes) -> None:
    """torch.export.load tries weights_only=True, then unpickles unsafely: only the first may succeed.

    Called exactly as torch calls it (no map_location), so what passes here also passes there."""
    if not data:
        return
    import torch

    from .torch_checkpoint import short_text, unpickling_refusal

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise Pt2Refusal(f"the sample inputs ({SAMPLE_INPUTS}) hold objects other than tensors and plain "
                         f"containers ({unpickling_refusal(exc)}); {_NEVER_UNPICKLES}") from None
    except Exception as exc:  # any failure would make torch retry with weights_only=False
        first = (str(exc).strip().splitlines() or [""])[0]
        raise Pt2Refusal(f"the sample inputs ({SAMPLE_INPUTS}) do not load with torch.load(weights_only=True) "
                         f"({type(exc).__name__}: {short_text(first)}), and torch.export.load would then "
                         f"unpickle them; {_NEVER_UNPICKLES}") from None


# ---------------------------------------------------------------------------- the program document

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OP_TARGET = re.compile(r"#[A-Za-z0-9_.:]+|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_SYMBOL_KEY = re.compile(r"[a-z]{1,8}\d{1,%d}" % MAX_SYMBOL_INDEX_DIGITS)
_TORCH_VERSION = re.compile(r"[A-Za-z0-9_.+\-<=]{0,64}")
_NAME_FORBIDDEN = re.compile(r"""["'\\\x00-\x1f\x7f]""")
_TEXT_FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_KNOWN_VERIFIERS = ("ATEN", "TRAINING")

# Keys whose string values become Python identifiers in generated code (placeholders, arguments).
_IDENTIFIER_KEYS = {"name", "as_name", "forward_arg_names"}
# Strings that torch never turns into code: messages, string arguments, metadata, stack traces.
_TEXT_KEYS = {"as_string", "as_strings", "stack_trace"}


def _is_identifier(text: str) -> bool:
    """An ASCII Python name that is not a keyword: safe wherever torch writes it into code."""
    return len(text) <= MAX_NAME_CHARS and bool(_IDENTIFIER.fullmatch(text)) and not keyword.iskeyword(text)


def _where(path: list) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "program"


def _plain_name(value, what: str) -> None:
    """A qualified name (parameter, module path, type): never breaks out of a quoted Python string."""
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS or _NAME_FORBIDDEN.search(value):
        raise Pt2Refusal(f"{what} {_show(value)} contains quotes, backslashes or control characters")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_program(doc) -> None:
    """Walk models/model.json; each string is checked by what torch does with it."""
    if not isinstance(doc, dict):
        raise Pt2Refusal(f"{PROGRAM} is not a JSON object")
    verifiers = doc.get("verifiers")
    if not (isinstance(verifiers, list) and verifiers and all(v in _KNOWN_VERIFIERS for v in verifiers)):
        # the verifier is what refuses graph nodes that call arbitrary Python functions
        raise Pt2Refusal(f"{PROGRAM} names verifiers {_show(verifiers)} (expected some of {list(_KNOWN_VERIFIERS)})")
    stack: list[tuple[object, str | None, str | None, list]] = [(doc, None, None, [])]
    while stack:
        value, key, parent, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise Pt2Refusal(f"{PROGRAM} is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(value, dict):
            if key in _IDENTIFIER_KEYS or key in ("expr_str", "target", "in_spec", "out_spec", "guards_code"):
                raise Pt2Refusal(f"{_where(path)} is an object where a string belongs")
            if "nodes" in value and isinstance(value.get("inputs"), list):
                _check_graph_inputs(value["inputs"], path)
            for k, v in value.items():
                _check_key(k, key, path)
                stack.append((v, k, key, path + [k]))
        elif isinstance(value, list):
            stack.extend((v, key, parent, path + [i]) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, key, parent, path)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT_MAGNITUDE:
            raise Pt2Refusal(f"{_where(path)} holds an integer beyond 64 bits")


def _check_key(k: str, container: str | None, path: list) -> None:
    where = f"{_where(path)}: key"
    if container == "range_constraints":
        # torch counts up to an unbacked symbol's index, so the index is bounded too
        if not _SYMBOL_KEY.fullmatch(k):
            raise Pt2Refusal(f"{where} {_show(k)} is not a symbol name such as s0 or u12")
    elif container in ("treespec_namedtuple_fields", "as_string_to_argument"):
        _plain_name(k, where)
    elif not _is_identifier(k):
        raise Pt2Refusal(f"{where} {_show(k)} is not an identifier")


def _check_string(value: str, key: str | None, parent: str | None, path: list) -> None:
    where = _where(path)
    if key == "expr_str":
        check_sym_expr(value, where)
    elif key == "guards_code":
        check_guard(value, where)
    elif key in ("in_spec", "out_spec"):
        _check_treespec(value, where)
    elif key in _IDENTIFIER_KEYS:
        if value and not _is_identifier(value):
            raise Pt2Refusal(f"{where} {_show(value)} is not an identifier")
    elif key in ("target", "as_operator"):
        if not (_OP_TARGET.fullmatch(value) and "__" not in value and len(value) <= MAX_NAME_CHARS):
            raise Pt2Refusal(f"{where} {_show(value)} is not an operator name")
    elif key in _TEXT_KEYS or parent == "metadata":
        if len(value) > MAX_TEXT_CHARS or _TEXT_FORBIDDEN.search(value):
            raise Pt2Refusal(f"{where} holds control characters or is longer than {MAX_TEXT_CHARS} characters")
    elif key == "torch_version":
        if not _TORCH_VERSION.fullmatch(value):
            raise Pt2Refusal(f"{where} {_show(value)} is not a version")
    else:
        _plain_name(value, where)


def _check_graph_inputs(inputs: list, path: list) -> None:
    """A string graph input becomes a guard `x == '<value>'` that ExportedProgram.module() exec()s."""
    for i, item in enumerate(inputs):
        if isinstance(item, dict) and "as_string" in item:
            _plain_name(item["as_string"], f"{_where(path + ['inputs', i])} string input")


def _check_treespec(text: str, where: str) -> None:
    """in_spec / out_spec: JSON; its keys end up quoted in generated code (the module's signature)."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        raise Pt2Refusal(f"{where} is not a valid tree spec") from None
    stack, depth_limit = [(spec, 0)], MAX_JSON_DEPTH
    while stack:
        value, depth = stack.pop()
        if depth > depth_limit:
            raise Pt2Refusal(f"{where} is nested too deeply")
        if isinstance(value, dict):
            for k, v in value.items():
                _plain_name(k, f"{where} key")
                if k == "context" and isinstance(v, str):
                    try:
                        v = json.loads(v)
                    except (ValueError, RecursionError):
                        raise Pt2Refusal(f"{where} has a context that is not JSON") from None
                stack.append((v, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            _plain_name(value, f"{where} entry")


# --------------------------------------------------------------------------- symbolic expressions

# What torch's serializer writes (sympy.srepr): calls of these sympy / torch.utils._sympy classes.
_SYMPY_CALLS = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Equality", "Unequality", "GreaterThan", "LessThan", "StrictGreaterThan", "StrictLessThan", "And", "Or",
    "Not", "Piecewise", "ExprCondPair",
    # the functions torch's deserializer passes to sympify (torch/_export/serde/serialize.py)
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity",
}
_SYMPY_ATOMS = {"true", "false", "oo", "nan", "zoo"}
_ASSUMPTIONS = {
    "integer", "positive", "negative", "nonnegative", "nonpositive", "zero", "nonzero", "real", "finite",
    "infinite", "rational", "irrational", "even", "odd", "prime", "composite", "commutative", "complex",
    "extended_real", "extended_positive", "extended_negative", "extended_nonnegative", "extended_nonpositive",
    "extended_nonzero", "hermitian", "antihermitian", "imaginary", "algebraic", "transcendental", "noninteger",
}
# Calls whose second argument is an exponent or shift: a literal, small, so nothing huge is computed.
_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift"}
_MAX_EXPONENT = 64
_EXPR_TOKEN = re.compile(r"[ \t]*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<int>\d{1,40})|'(?P<str>[^']{0,64})'"
                         r"|(?P<punct>[(),=\-]))")
_SYMBOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,31}(?:_[A-Za-z0-9]{1,31}){0,3}")
_FLOAT_TEXT = re.compile(r"[+\-]?(?:\d{1,400}(?:\.\d{0,400})?(?:[eE][+\-]?\d{1,4})?|inf|nan)")


def _tokens(text: str, pattern: re.Pattern, where: str, grammar: str):
    """(kind, text) pairs, lazily: a caller may refuse a bad name before a later bad character."""
    pos = 0
    text = text.rstrip(" \t")
    while pos < len(text):
        m = pattern.match(text, pos)
        if not m or m.end() == pos:
            raise Pt2Refusal(f"{where} {_show(text)} is not {grammar} (at {_show(text[pos:pos + 20])}); "
                             f"{_NEVER_EVALUATES}")
        yield m.lastgroup, m.group(m.lastgroup)
        pos = m.end()


class _ExprParser:
    """Recursive descent over srepr output: call(args) | -? integer | atom; nothing else."""

    def __init__(self, text: str, where: str):
        self.text, self.where = text, where
        self.tokens = list(_tokens(text, _EXPR_TOKEN, where, "a symbolic shape"))
        self.pos = 0

    def fail(self, why: str):
        raise Pt2Refusal(f"{self.where} {_show(self.text)} is not a symbolic shape ({why}); {_NEVER_EVALUATES}")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        tok = self.peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            self.fail(f"expected {value or kind}, found {tok[1] or 'the end'!r}")
        self.pos += 1
        return tok[1]

    def parse(self) -> None:
        self.expr(0)
        if self.pos != len(self.tokens):
            self.fail("trailing text")

    def expr(self, depth: int) -> tuple[str, object]:
        """("int", value), ("atom", name) or ("call", (name, contains a power, arguments))."""
        if depth > MAX_EXPR_DEPTH:
            self.fail("nested too deeply")
        negative = self.peek() == ("punct", "-")
        if negative:
            self.pos += 1
        kind, value = self.peek()
        if kind == "int":
            self.pos += 1
            return "int", -int(value) if negative else int(value)
        name = self.take("name")
        if name in _SYMPY_ATOMS:
            return "atom", name
        if name not in _SYMPY_CALLS:
            self.fail(f"unknown name {name!r}")
        self.take("punct", "(")
        args: list[tuple[str, object]] = []
        while self.peek() != ("punct", ")"):
            if args:
                self.take("punct", ",")
            args.append(self.argument(name, len(args), depth))
        self.take("punct", ")")
        nested_power = name in _POWERS or any(kind == "call" and info[1] for kind, info in args)
        if name in _POWERS:
            self.check_power(name, args)
        return "call", (name, nested_power, args)

    def argument(self, call: str, index: int, depth: int) -> tuple[str, object]:
        kind, value = self.peek()
        if kind == "str":
            self.pos += 1
            if index != 0 or call not in ("Symbol", "Float"):
                self.fail(f"a string argument to {call}")
            if not (_SYMBOL_NAME if call == "Symbol" else _FLOAT_TEXT).fullmatch(value):
                self.fail(f"{call} name {value!r}")
            return "str", value
        if kind == "name" and self.tokens[self.pos + 1:self.pos + 2] == [("punct", "=")]:
            self.pos += 2
            if value == "precision" and call == "Float":
                return "kw", self.take("int")
            if value not in _ASSUMPTIONS:
                self.fail(f"keyword {value!r}")
            flag = self.take("name")
            if flag not in ("True", "False"):
                self.fail(f"{value}={flag}")
            return "kw", flag
        return self.expr(depth + 1)

    def check_power(self, name: str, args: list) -> None:
        exponent = args[1] if len(args) == 2 else None
        if exponent is None or not _small_literal(exponent):
            self.fail(f"{name} with an exponent that is not a literal of at most {_MAX_EXPONENT}")
        if args[0][0] == "call" and args[0][1][1]:
            self.fail(f"{name} of a power")


def _small_literal(arg: tuple[str, object]) -> bool:
    kind, info = arg
    if kind == "int":
        return abs(info) <= _MAX_EXPONENT
    if kind != "call":
        return False
    name, _, inner = info
    if name == "Float":
        return True  # a float power cannot build a huge integer
    if name in ("Integer", "Rational"):
        return all(k == "int" and abs(v) <= _MAX_EXPONENT for k, v in inner)
    return False


def check_sym_expr(text: str, where: str = "expression") -> None:
    """Raise unless `text` is a symbolic shape as torch's serializer writes it (sympy.srepr of
    Symbol/Integer/... and the torch.utils._sympy functions), so that sympy.sympify evaluates
    nothing but those constructors."""
    if len(text) > MAX_EXPR_CHARS:
        raise Pt2Refusal(f"{where} is longer than {MAX_EXPR_CHARS} characters")
    _ExprParser(text, where).parse()


# --------------------------------------------------------------------------------- input guards

# ExportedProgram.module() exec()s these inside `torch._assert(<guard>, ...)`, in a namespace with
# math, torch and sympy helpers; only what torch's shape-guard printer writes may appear.
_GUARD_TOKEN = re.compile(r"""[ \t]*(?:
    (?P<source>L(?:\[(?:'[A-Za-z_][A-Za-z0-9_]*'|\d{1,9})\])+
        (?:\.(?:size|stride)\(\)\[\d{1,4}\]|\.(?:storage_offset|item)\(\))?)
  | (?P<number>\d{1,64}(?:\.\d{1,64})?(?:[eE][+\-]?\d{1,4})?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)
  | (?P<op>==|!=|<=|>=|//|\*\*|[-+*/%<>(),&|^~])
)""", re.X)
_GUARD_NAMES = {
    "and", "or", "not", "True", "False", "abs", "max", "min", "round", "int", "float", "len",
    "math.floor", "math.ceil", "math.trunc", "math.inf", "math.nan", "math.sqrt", "math.isnan", "math.isinf",
    "math.exp", "math.log", "math.log2", "math.cos", "math.cosh", "math.acos", "math.sin", "math.sinh",
    "math.asin", "math.tan", "math.tanh", "math.atan", "torch.sym_float", "torch.sym_int", "torch.sym_max",
    "torch.sym_min", "torch.sym_sqrt", "torch._sym_sqrt", "torch.sym_ite", "torch.sym_not",
}


def check_guard(text: str, where: str = "guard") -> None:
    """Raise unless `text` is an input guard made of input sizes, numbers, operators and the few
    math functions torch's printer uses."""
    if len(text) > MAX_EXPR_CHARS:
        raise Pt2Refusal(f"{where} is longer than {MAX_EXPR_CHARS} characters")
    for kind, value in _tokens(text, _GUARD_TOKEN, where, "an input guard"):
        if kind == "name" and value not in _GUARD_NAMES:
            raise Pt2Refusal(f"{where} {_show(text)} uses {value!r}, which is not a shape function; {_NEVER_EVALUATES}")
    try:  # torch parses it before running it: a syntax error would surface in module()
        ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Pt2Refusal(f"{where} {_show(text)} is not a valid guard expression") from None
