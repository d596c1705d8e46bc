"""Hostile or unlucky inputs, outputs and signals: one clean `cdlcodec: error:` line, exit status 2
(or 143 for SIGTERM), never a traceback, an internal error (exit 3) or a file left behind."""
from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from cdlcodec.io.safetensors_file import read_safetensors_tensors


def write_safetensors_raw(path, header: bytes, data: bytes = b"") -> None:
    """A .safetensors file with exactly this header text (padded to 8 bytes as the format does)."""
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def assert_one_error_line(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("cdlcodec: error: ") and err.count("\n") == 1, err
    assert "internal error" not in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".cdlcodec-"))


# ------------------------------------------------------------------------------- hostile .safetensors headers

def _entry(shape, offsets):
    return {"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}


HOSTILE_HEADERS = {
    "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "nests arrays or objects too deeply"),
    "nested inside an entry": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
    "5,000-digit dimension": (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}',
                              "a number with too many digits"),
    "5,000-digit offset": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}",
                           "a number with too many digits"),
    "empty, other dimension 2**70": (json.dumps(_entry([0, 2**70], [0, 0])).encode(), "a shape no array can have"),
    "empty, dimensions beyond int64": (json.dumps(_entry([0, 2**63, 2**63], [0, 0])).encode(), "a shape no array can have"),
    "empty, product beyond int64": (json.dumps(_entry([0, 2**31, 2**31], [0, 0])).encode(), "a shape no array can have"),
    "65 dimensions": (json.dumps(_entry([0] * 65, [0, 0])).encode(), "a shape no array can have"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_safetensors_header_is_a_clean_error(tmp_path, cli, case):
    header, message = HOSTILE_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    write_safetensors_raw(path, header)
    code, _, err = cli("encode", path, "-o", tmp_path / "out.cdl", "-q")
    assert_one_error_line(code, err, "not a valid .safetensors file", message)
    assert not (tmp_path / "out.cdl").exists() and not leftovers(tmp_path)


def test_empty_tensor_with_representable_shape_still_reads(tmp_path):
    path = tmp_path / "empty.safetensors"
    write_safetensors_raw(path, json.dumps(_entry([0, 2**40], [0, 0])).encode())
    ((name, array, dtype),) = read_safetensors_tensors(str(path))
    assert (name, array.shape, dtype) == ("a", (0, 2**40), "float32")


# ------------------------------------------------------------------------------- weights that are not ordinary

def test_finite_weights_near_the_float32_maximum_encode(tmp_path, cli):
    """np.std in float32 overflows to inf here; the step falls back to float64 instead of failing."""
    from cdlcodec.quantizers.uniform import UniformQuantizer

    w = np.random.default_rng(0).uniform(-3e38, 3e38, (16, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow RuntimeWarning on the terminal either
        step = UniformQuantizer(rel_step=0.1).step_for(w)
    assert step == pytest.approx(0.1 * np.std(w.astype(np.float64)), rel=1e-6)
    torch.save({"huge.weight": torch.from_numpy(w)}, tmp_path / "huge.pt")
    code, _, err = cli("encode", tmp_path / "huge.pt", "-o", tmp_path / "huge.cdl", "-q")
    assert code == 0, err
    code, _, err = cli("decode", tmp_path / "huge.cdl", "-o", tmp_path / "back.pt", "-q")
    assert code == 0, err
    back = torch.load(tmp_path / "back.pt", weights_only=True)["huge.weight"].numpy()
    assert np.all(np.isfinite(back))
    assert np.max(np.abs(back.astype(np.float64) - w)) <= step / 2 * (1 + 1e-6)


@pytest.mark.parametrize("options", [(), ("--bits", "4"), ("--lambda", "0.1"), ("--granularity", "channel"),
                                     ("--trellis",)], ids=lambda o: " ".join(o) or "default")
def test_nan_names_the_tensor_and_the_keep_it_suggests_works(tmp_path, cli, options):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 8, generator=g)
    weight[3, 5] = float("nan")
    odd = torch.randn(4, 4, generator=g)
    odd[0, 0] = float("inf")
    torch.save({"conv.weight": torch.randn(4, 4, generator=g), "fc.weight": weight,
                "layers[0].weight": odd}, tmp_path / "m.pt")
    code, _, err = cli("encode", tmp_path / "m.pt", "-o", tmp_path / "m.cdl", "-q", *options)
    assert_one_error_line(code, err)
    assert err == ("cdlcodec: error: tensor 'fc.weight' holds NaN or infinite values; "
                   "keep it lossless with --keep 'fc.weight'\n")
    assert not (tmp_path / "m.cdl").exists() and not leftovers(tmp_path)

    code, _, err = cli("encode", tmp_path / "m.pt", "-o", tmp_path / "m.cdl", "-q", *options, "--keep", "fc.weight")
    assert_one_error_line(code, err, "tensor 'layers[0].weight' holds NaN or infinite values")
    suggested = shlex.split(err.split("lossless with ")[1])   # a glob that matches only this name
    assert suggested == ["--keep", "layers[[]0].weight"]
    code, _, err = cli("encode", tmp_path / "m.pt", "-o", tmp_path / "m.cdl", "-q", *options,
                       "--keep", "fc.weight", *suggested)
    assert code == 0, err
    assert cli("decode", tmp_path / "m.cdl", "-o", tmp_path / "back.pt", "-q")[0] == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert torch.equal(back["fc.weight"].isnan(), weight.isnan()) and torch.equal(back["layers[0].weight"], odd)


def test_quantizer_errors_name_the_tensor(tmp_path, cli, state_dict_file):
    code, _, err = cli("encode", state_dict_file, "-o", tmp_path / "m.cdl", "--step", "1e-30", "-q")
    assert_one_error_line(code, err, "tensor 'conv.weight': step 1e-30 is too small")


# ------------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("command", ["encode", "decode"])
def test_missing_output_directory_names_the_output(tmp_path, cli, state_dict_file, command):
    source = state_dict_file
    if command == "decode":
        source = tmp_path / "m.cdl"
        assert cli("encode", state_dict_file, "-o", source, "-q")[0] == 0
    out = tmp_path / "missing" / "out.pt"
    code, _, err = cli(command, source, "-o", out, "-q")
    assert_one_error_line(code, err, f"cannot write {out}: no such directory {tmp_path / 'missing'}")
    assert ".cdlcodec-" not in err
    not_a_dir = state_dict_file / "out.pt"
    code, _, err = cli(command, source, "-o", not_a_dir, "-q")
    assert_one_error_line(code, err, f"cannot write {not_a_dir}: a part of its directory path is not a directory")


def test_unwritable_output_directory_names_the_output(tmp_path, cli, state_dict_file, monkeypatch):
    """We may run as root, whom no permission stops: the refusal comes from a stand-in for mkstemp."""
    import cdlcodec.formats.container  # where the atomic writer that every output goes through lives

    def refuse(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, f"{prefix}x7q2{suffix}"))

    monkeypatch.setattr(cdlcodec.formats.container.tempfile, "mkstemp", refuse)
    out = tmp_path / "out.cdl"
    code, _, err = cli("encode", state_dict_file, "-o", out, "-q")
    assert_one_error_line(code, err, f"cannot write {out}: permission denied")
    assert ".cdlcodec-" not in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_for_real(tmp_path, cli, state_dict_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = cli("encode", state_dict_file, "-o", locked / "out.cdl", "-q")
    finally:
        locked.chmod(0o755)
    assert_one_error_line(code, err, f"cannot write {locked / 'out.cdl'}: permission denied")


def test_output_that_is_the_input_is_refused(tmp_path, cli, state_dict_file):
    original = state_dict_file.read_bytes()
    (tmp_path / "link.pt").symlink_to(state_dict_file)
    for out, extra in ((state_dict_file, ()), (tmp_path / "link.pt", ()), (state_dict_file, ("--arch", "lenet5"))):
        code, _, err = cli("encode", state_dict_file, "-o", out, "-q", *extra)
        assert_one_error_line(code, err, f"the output {out} is the input file {state_dict_file}")
        assert state_dict_file.read_bytes() == original
    # a container with a model's extension, decoded onto itself
    container = tmp_path / "container.pt"
    assert cli("encode", state_dict_file, "-o", container, "-q")[0] == 0
    coded = container.read_bytes()
    code, _, err = cli("decode", container, "-o", container, "-q")
    assert_one_error_line(code, err, f"the output {container} is the input file {container}")
    assert container.read_bytes() == coded


# ------------------------------------------------------------------------------- signals

def test_sigterm_during_encode_leaves_no_file(tmp_path):
    """SIGTERM unwinds like Ctrl-C: the temporary file is removed, exit status 128 + 15."""
    rng = np.random.default_rng(0)
    torch.save({f"layer{i}.weight": torch.from_numpy(rng.standard_normal((1024, 1024), dtype=np.float32))
                for i in range(4)}, tmp_path / "big.pt")
    out = tmp_path / "big.cdl"
    proc = subprocess.Popen([sys.executable, "-m", "cdlcodec", "encode", str(tmp_path / "big.pt"), "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leftovers(tmp_path) and proc.poll() is None, "the encode finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == "cdlcodec: terminated\n"
    assert not leftovers(tmp_path) and not out.exists()
