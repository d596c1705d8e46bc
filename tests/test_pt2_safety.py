"""Hostile .pt2 archives: refused before torch.export.load sees them, as a file given to `encode`
and as the torch.export section of a CRC-valid .cdl (`decode -o x.pt2`, `cdlcodec.load`); nothing
they carry ever runs (issue #11)."""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import sympy
import torch
from torch import nn

import cdlcodec
from cdlcodec.codec import EncodeOptions, encode_records
from cdlcodec.errors import CdlFormatError, CdlInputError
from cdlcodec.io.pt2_archive import Pt2Refusal, check_guard, check_pt2_archive, check_sym_expr
from cdlcodec.records import TensorRecord


class Small(nn.Module):
    """Parameters, a buffer and a lifted tensor constant; exported with a dynamic batch dimension."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))
        self.offset = torch.tensor([1.0, 2.0, 3.0])

    def forward(self, x):
        return self.fc(x) * self.scale + self.offset


@pytest.fixture(scope="module")
def program_bytes() -> bytes:
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(Small(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rewrite(data: bytes, edit=None, add=(), compress=()) -> bytes:
    """A copy of the archive with member bodies passed through edit(name, body) and members added
    (names relative to the archive's folder)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    root = src.namelist()[0].split("/")[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name case
        for full in src.namelist():
            name, body = full[len(root) + 1:], src.read(full)
            kind = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            dst.writestr(full, edit(name, body) if edit else body, compress_type=kind)
        for name, body in add:
            dst.writestr(f"{root}/{name}", body)
    return out.getvalue()


def json_edit(member: str, change):
    def edit(name, body):
        if name != member:
            return body
        doc = json.loads(body)
        change(doc)
        return json.dumps(doc).encode()
    return edit


def _pickled_payload(config: str, key: str, member: str):
    """An archive whose payload `member` holds a pickle that runs code, marked use_pickle in `config`."""
    def build(data, marker):
        def change(doc):
            doc["config"][key]["use_pickle"] = True

        def edit(name, body):
            if name == member:
                return torch_saved(RunsCode(marker))
            return json_edit(config, change)(name, body)
        return rewrite(data, edit)
    return build


_pickled_weight = _pickled_payload("data/weights/model_weights_config.json", "fc.weight", "data/weights/weight_0")
_pickled_constant = _pickled_payload("data/constants/model_constants_config.json", "offset", "data/constants/tensor_0")


def _object_constant(prefix):
    def build(data, marker):
        def change(doc):
            doc["config"]["obj"] = {"path_name": f"{prefix}_0", "is_param": False, "use_pickle": True,
                                    "tensor_meta": None}
        return rewrite(data, json_edit("data/constants/model_constants_config.json", change),
                       add=[(f"data/constants/{prefix}_0", pickle.dumps(RunsCode(marker)))])
    return build


def _legacy_weights(data, marker):
    return rewrite(data, add=[("data/weights/model.pt", torch_saved({"fc.weight": RunsCode(marker)}))])


def _sample_inputs(data, marker):
    evil = torch_saved(((RunsCode(marker),), {}))
    return rewrite(data, lambda name, body: evil if name == "data/sample_inputs/model.pt" else body)


def _program_text(data, old, new):
    def edit(name, body):
        return body.replace(old.encode(), new.encode()) if name == "models/model.json" else body
    return rewrite(data, edit)


def _expression(data, marker):
    def change(doc):
        sizes = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] = f"__import__('os').system('touch {marker}')"
    return rewrite(data, json_edit("models/model.json", change))


def _input_name(data, marker):
    # a graph input's name becomes a parameter of the generated forward(): a default value runs
    return _program_text(data, '"x"', json.dumps(f"x=__import__('os').system('touch {marker}')"))


def _guard(data, marker):
    def change(doc):
        doc["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
    return rewrite(data, json_edit("models/model.json", change))


def _signature_edit(change):
    def build(data, marker):
        return rewrite(data, json_edit("models/model.json",
                                       lambda doc: change(doc["graph_module"]["module_call_graph"][0]["signature"], marker)))
    return build


def _argument_name(signature, marker):
    # ExportedProgram.module() writes these into `def forward(self, <names>)` and exec()s it
    signature["forward_arg_names"] = [f"x=__import__('os').system('touch {marker}')"]


def _keyword_key(signature, marker):
    # keyword names from the input spec are written quoted into the generated forward()
    spec = json.loads(signature["in_spec"])
    kwargs = spec[1]["children_spec"][1]
    kwargs["context"] = json.dumps([f"y': __import__('os').system('touch {marker}'), '"])
    kwargs["children_spec"] = [{"type": None, "context": None, "children_spec": []}]
    signature["in_spec"] = json.dumps(spec)
    signature["forward_arg_names"] = ["x", "y"]


def _no_verifier(data, marker):
    return rewrite(data, json_edit("models/model.json", lambda doc: doc.update(verifiers=[])))


def _unbacked_index(data, marker):
    def change(doc):
        doc["range_constraints"]["u999999999"] = {"min_val": 0, "max_val": 4}
    return rewrite(data, json_edit("models/model.json", change))


def _empty_payload(data, marker):
    # torch.export.load makes torch.zeros(declared sizes) of an empty record: any size, from no data
    return rewrite(data, lambda name, body: b"" if name == "data/weights/weight_0" else body)


HOSTILE = {
    "pickled weight": (_pickled_weight, "pickled data (data/weights/weight_0 marked use_pickle); cdlcodec never unpickles"),
    "pickled constant": (_pickled_constant, "data/constants/tensor_0 marked use_pickle"),
    "opaque object": (_object_constant("opaque_obj"), "pickled objects (data/constants/opaque_obj_0)"),
    "torchbind object": (_object_constant("custom_obj"), "pickled objects (data/constants/custom_obj_0)"),
    "legacy weights": (_legacy_weights, "pickled data (legacy file data/weights/model.pt)"),
    "sample inputs": (_sample_inputs, "the sample inputs (data/sample_inputs/model.pt) hold objects other than tensors "
                                      "and plain containers (it names posix.system); cdlcodec never unpickles"),
    "compiled code": (lambda d, m: rewrite(d, add=[("data/aotinductor/model/model.so", b"\x7fELF")]),
                      "compiled code (data/aotinductor/model/model.so)"),
    "expression": (_expression, "is not a symbolic shape"),
    "input name": (_input_name, "is not an identifier"),
    "guard": (_guard, "which is not a shape function"),
    "argument name": (_signature_edit(_argument_name), "forward_arg_names[0] \"x=__import__('os')"),
    "keyword key": (_signature_edit(_keyword_key), "contains quotes, backslashes or control characters"),
    "no verifier": (_no_verifier, "names verifiers []"),
    "unbacked index": (_unbacked_index, "'u999999999' is not a symbol name"),
    "empty payload": (_empty_payload, "'fc.weight' (data/weights/weight_0) needs 48 bytes but 0 are stored"),
    "second program": (lambda d, m: rewrite(d, add=[("models/other.json", b"{}")]), "a second program (models/other.json)"),
    "stray member": (lambda d, m: rewrite(d, add=[("code.py", b"")]), "unexpected member 'code.py'"),
    "compressed member": (lambda d, m: rewrite(d, compress={"models/model.json"}), "'models/model.json' is compressed"),
    "duplicate member": (lambda d, m: rewrite(d, add=[("models/model.json", b"{}")]), "'models/model.json' appears twice"),
}


def container_with_program(path, archive: bytes) -> None:
    """A CRC-valid .cdl whose torch.export section is `archive` (the weights do not matter here)."""
    record = TensorRecord("fc.weight", np.zeros((3, 4), np.float32), "float32")
    encode_records([record], str(path), EncodeOptions(backend="raw", quiet=True),
                   {"source.kind": "torch.export", "graph": "torch.export", "torch.version": torch.__version__},
                   [("model.pt2", "torch.export", archive)])


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_everywhere(tmp_path, cli, program_bytes, case):
    build, message = HOSTILE[case]
    marker = tmp_path / "MARKER"
    evil = build(program_bytes, marker)
    (tmp_path / "evil.pt2").write_bytes(evil)

    code, _, err = cli("encode", tmp_path / "evil.pt2", "-o", tmp_path / "out.cdl", "-q")
    assert code == 2 and err.startswith("cdlcodec: error:") and err.count("\n") == 1, err
    assert "evil.pt2: refused: " in err and message in err, err
    assert not (tmp_path / "out.cdl").exists()

    container_with_program(tmp_path / "evil.cdl", evil)
    code, _, err = cli("decode", tmp_path / "evil.cdl", "-o", tmp_path / "out.pt2", "-q")
    assert code == 2 and err.count("\n") == 1 and "section 'model.pt2': refused: " in err and message in err, err
    assert not (tmp_path / "out.pt2").exists()
    with pytest.raises(CdlFormatError, match="refused"):
        cdlcodec.load(str(tmp_path / "evil.cdl"))
    assert not marker.exists()


def test_pickled_weight_through_the_real_entry_point(tmp_path, run_cli, program_bytes):
    marker = tmp_path / "MARKER"
    evil = _pickled_weight(program_bytes, marker)
    (tmp_path / "evil.pt2").write_bytes(evil)
    container_with_program(tmp_path / "evil.cdl", evil)
    for args, out in ((("encode", tmp_path / "evil.pt2", "-o", tmp_path / "o.cdl"), tmp_path / "o.cdl"),
                      (("decode", tmp_path / "evil.cdl", "-o", tmp_path / "o.pt2"), tmp_path / "o.pt2")):
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("cdlcodec: error:") and result.stderr.count("\n") == 1
        assert "marked use_pickle); cdlcodec never unpickles" in result.stderr
        assert not out.exists() and not marker.exists()


def test_the_unmodified_program_passes_and_round_trips(tmp_path, cli, program_bytes):
    check_pt2_archive(program_bytes, "small.pt2", CdlInputError)
    (tmp_path / "small.pt2").write_bytes(program_bytes)
    assert cli("encode", tmp_path / "small.pt2", "-o", tmp_path / "s.cdl", "-q", "--backend", "raw")[0] == 0
    assert cli("decode", tmp_path / "s.cdl", "-o", tmp_path / "s.pt2", "-q")[0] == 0
    check_pt2_archive((tmp_path / "s.pt2").read_bytes(), "s.pt2", CdlInputError)
    x = torch.randn(5, 4)
    expected = torch.export.load(tmp_path / "s.pt2").module()(x)
    torch.testing.assert_close(cdlcodec.load(str(tmp_path / "s.cdl"))(x), expected)


class Rich(nn.Module):
    """What ordinary programs carry beyond Small: keyword and string inputs, string arguments,
    a ModuleDict key that is not an identifier, dict outputs and shape guards."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"a-b": nn.Linear(4, 4), "c d": nn.Linear(4, 4)})
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, y, *, mode: str = "tanh"):
        h = self.bn(self.blocks["a-b"](x) + self.blocks["c d"](x))
        h = torch.nn.functional.gelu(torch.einsum("bi,i->b", h, torch.ones(4)), approximate=mode)
        if x.shape[0] > 2:
            h = h[: x.shape[0] // 2]
        return {"out": torch.div(h, 3, rounding_mode="floor"), "pair": (y.sum(), h * 2)}


def test_ordinary_programs_pass(tmp_path, cli):
    auto = torch.export.Dim.AUTO
    programs = {
        "rich": torch.export.export(Rich().eval(), (torch.randn(6, 4), torch.randn(6, 2)), {"mode": "tanh"},
                                    dynamic_shapes={"x": {0: auto}, "y": {0: auto}, "mode": None}),
        "cond": torch.export.export(CondNet(), (torch.randn(2, 3),)),
    }
    for name, program in programs.items():
        buf = io.BytesIO()
        torch.export.save(program, buf)
        data = buf.getvalue()
        doc = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("archive/models/model.json"))
        if name == "rich":
            assert doc["guards_code"], "the guards checked below must be present"
        check_pt2_archive(data, name, CdlInputError)
        (tmp_path / f"{name}.pt2").write_bytes(data)
        assert cli("encode", tmp_path / f"{name}.pt2", "-o", tmp_path / f"{name}.cdl", "-q")[0] == 0
        assert callable(cdlcodec.load(str(tmp_path / f"{name}.cdl")))


class CondNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: self.lin(t), lambda t: t * 2, (x,))


def test_symbolic_shapes_torch_writes_are_accepted():
    from torch.utils._sympy.functions import (CeilDiv, FloatPow, FloatTrueDiv, FloorDiv, IntTrueDiv,
                                              ModularIndexing, PythonMod, ToFloat, TruncToInt, Where)

    s = sympy.Symbol("s0", positive=True, integer=True)
    u = sympy.Symbol("u1", integer=True)
    f = sympy.Symbol("zf0", real=True)
    for expr in (s * 2 + 1, -s, s**2, 1 / s, s - u, sympy.Eq(s, u), sympy.Ne(s, 4), s < u, s <= 3, s > 2,
                 sympy.And(u >= 0, u < s), sympy.Or(sympy.Eq(s, 1), sympy.Eq(s, 2)), sympy.Max(s, u),
                 sympy.Min(s, 4), sympy.sqrt(f), sympy.Rational(1, 3) * f, sympy.Float(1.5) * f, -sympy.oo,
                 sympy.true, FloorDiv(s, 2), ModularIndexing(s, 2, 4), CeilDiv(s, 3), ToFloat(s), TruncToInt(f),
                 sympy.Mod(s, 3), PythonMod(u, 3), Where(sympy.Eq(s, 1), s, u), IntTrueDiv(s, u),
                 FloatTrueDiv(f, f + 1), FloatPow(f, sympy.Float(2.0)), sympy.Abs(u), sympy.floor(f),
                 sympy.Piecewise((s, sympy.Eq(s, 1)), (u, True))):
        check_sym_expr(sympy.srepr(expr))
    for guard in ("L['x'].size()[0] > 4", "(L['x'].size()[0] // 2) <= L['x'].size()[0]",
                  "((8*L['y'].size()[0] + 8*L['x'].size()[0]) % (2*L['y'].size()[0])) == 0",
                  "math.floor(L['x'].size()[0] / 3) != max(2, L['y'].stride()[0])"):
        check_guard(guard)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "Symbol('s0').__class__", "Integer(1).__class__.__base__",
    "eval('1')", "Symbol('__import__')", "Symbol(chr(95))", "Add(Symbol('s0'), lambda: 1)",
    "Pow(Integer(10), Integer(100000000000))", "LShift(Integer(1), Integer(99999999))",
    "Pow(Pow(Symbol('s0'), Integer(64)), Integer(64))", "Symbol('s0', evaluate=os)",
    "Float('1e5; import os')", "Integer(1) Integer(2)", "Integer(1)\nInteger(2)", "Max(" * 70 + "Integer(1)" + ")" * 70,
])
def test_expressions_outside_the_grammar_are_refused(text):
    with pytest.raises(Pt2Refusal):
        check_sym_expr(text)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "L['x'].__class__", "open('f') == 1", "L['x'].size()[0] > 4 or exec('1')",
    "L['x\\'].size()[0]", "(lambda: 1)() == 1", "L['x'].size()[0] > (", "torch.load('f')",
])
def test_guards_outside_the_grammar_are_refused(text):
    with pytest.raises(Pt2Refusal):
        check_guard(text)
