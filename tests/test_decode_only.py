"""Issue 15 item 5: `decode --only GLOB` decodes just the matching tensors, reading only their
payloads (seeks through the container index), and says how many bytes it read."""
from __future__ import annotations

import builtins
import os

import numpy as np
import pytest

import cdlcodec.formats.container as container_module
from cdlcodec.api import decode, encode
from cdlcodec.cli.main import main
from cdlcodec.codec import decode_container
from cdlcodec.errors import CdlInputError
from cdlcodec.formats import ContainerReader
from cdlcodec.formats.container import FOOTER, PREFIX
from cdlcodec.io.safetensors_file import read_safetensors_tensors


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    rng = np.random.default_rng(0)
    model = {}
    for i in range(8):
        model[f"layers.{i}.attn.weight"] = (rng.standard_normal((64, 48)) * 0.05).astype(np.float32)
        model[f"layers.{i}.norm.weight"] = rng.standard_normal(64).astype(np.float32)
    model["embed.weight"] = rng.standard_normal((100, 48)).astype(np.float16)
    path = tmp_path_factory.mktemp("only") / "m.cdl"
    encode(model, path, quantizer="uniform")
    return path


class _CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, fh, counter):
        self._fh, self._counter = fh, counter

    def read(self, *args):
        data = self._fh.read(*args)
        self._counter[self._fh.name] = self._counter.get(self._fh.name, 0) + len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.fixture
def bytes_read(monkeypatch):
    """Bytes read from each file the container module opens, counted at the file object."""
    counter: dict[str, int] = {}
    monkeypatch.setattr(container_module, "open",
                        lambda *a, **k: _CountingFile(builtins.open(*a, **k), counter), raising=False)
    return counter


def test_only_the_matching_payloads_are_read(tmp_path, container, bytes_read):
    out = tmp_path / "part.safetensors"
    model = decode(container, out, only=["layers.3.*"])
    measured = bytes_read[str(container)]

    with ContainerReader(container) as reader:
        index_length = reader.file_size - FOOTER.size - PREFIX.size - reader._payload_area
        selected = [e for e in reader.tensors if e.name.startswith("layers.3.")]
        size = reader.file_size
    assert [e.name for e in selected] == ["layers.3.attn.weight", "layers.3.norm.weight"]
    # the prefix, the footer, the index and the two payloads: nothing else
    assert measured == PREFIX.size + FOOTER.size + index_length + sum(e.length for e in selected)
    assert (model.bytes_read, model.file_size) == (measured, size)
    assert measured < size / 4

    full = {r.name: r for r in decode_container(str(container)).records}
    written = list(read_safetensors_tensors(str(out)))
    assert [name for name, _, _ in written] == [e.name for e in selected]
    for name, array, dtype in written:
        assert dtype == full[name].dtype
        np.testing.assert_array_equal(array, full[name].array)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_only_is_repeatable_and_says_what_it_read(tmp_path, container, capsys):
    code, out, err = _cli(["decode", container, "--only", "layers.1.*", "--only", "embed.*", "-o",
                           tmp_path / "p.safetensors"], capsys)
    assert code == 0, err
    size = os.path.getsize(container)
    assert f"-> {tmp_path / 'p.safetensors'}: 3 tensors" in out
    assert f" of {size:,} bytes (" in out and out.count("read ") == 1
    names = [name for name, _, _ in read_safetensors_tensors(str(tmp_path / "p.safetensors"))]
    assert names == ["layers.1.attn.weight", "layers.1.norm.weight", "embed.weight"]  # file order


def test_cli_only_to_a_torch_state_dict(tmp_path, container, capsys):
    torch = pytest.importorskip("torch")
    code, _, err = _cli(["decode", container, "--only", "*.norm.weight", "-o", tmp_path / "p.pt", "-q"], capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "p.pt", weights_only=True)
    assert sorted(state) == [f"layers.{i}.norm.weight" for i in range(8)]


@pytest.mark.parametrize("args, message", [
    (["--only", "layers.3.*", "--only", "layerz.*"], "no tensor of .*m.cdl matches 'layerz.*' \\(17 tensors, such as"),
    (["--only", "LAYERS.3.*"], "matches 'LAYERS.3.\\*'"),  # case-sensitive, as tensor names are
])
def test_a_glob_that_matches_nothing_is_a_clean_error(tmp_path, container, capsys, args, message):
    import re

    code, _, err = _cli(["decode", container, *args, "-o", tmp_path / "p.safetensors"], capsys)
    assert code == 2
    assert err.startswith("cdlcodec: error: ") and re.search(message, err), err
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("output", ["p.onnx", "folder"])
def test_a_subset_is_not_written_where_every_tensor_is_needed(tmp_path, container, output):
    with pytest.raises(CdlInputError, match="a subset of the tensors is decoded to a .safetensors or .pt file"):
        decode(container, tmp_path / output, only=["layers.3.*"])
    assert list(tmp_path.iterdir()) == []
