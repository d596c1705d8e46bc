"""Issue 15: encode and decode tensor by tensor (memory holds a few tensors, not the model), in
parallel on --threads N with the same bytes as on one thread, and load_into filling a module tensor
by tensor."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import cdlcodec
from cdlcodec import codec
from cdlcodec.codec import EncodeOptions, encode_records, iter_decoded, open_container, ordered_map
from cdlcodec.dtypes import from_float64
from cdlcodec.errors import CdlInputError
from cdlcodec.formats.container import ContainerWriter
from cdlcodec.io import safetensors_file
from cdlcodec.io.lazy import LazyTensorRecord
from cdlcodec.io.model_files import read_model
from cdlcodec.io.safetensors_file import SafetensorsWriter, read_safetensors_tensors, write_safetensors_tensors
from cdlcodec.quantizers import make


def _tensors(n: int = 12, rows: int = 64, cols: int = 96, seed: int = 15):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = rng.laplace(0, 0.02 * (1 + i % 3), (rows, cols))
        dtype = ("float32", "bfloat16", "float16")[i % 3]
        out.append((f"layers.{i}.weight", from_float64(w, dtype), dtype))
        out.append((f"layers.{i}.bias", rng.standard_normal(cols).astype(np.float32), "float32"))
    out.append(("steps", np.arange(5, dtype=np.int64), "int64"))
    return out


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors_tensors(str(path), _tensors())
    return path


def test_encode_output_is_the_same_on_any_thread_count(model, tmp_path, cli):
    for threads in (1, 2, 3):
        assert cli("encode", model, "-o", tmp_path / f"t{threads}.cdl", "--threads", str(threads), "-q")[0] == 0
    for backend in ("huffman", "cabac"):
        for threads in (1, 2):
            assert cli("encode", model, "-o", tmp_path / f"{backend}{threads}.cdl", "--backend", backend,
                           "--rel-step", "0.05", "--threads", str(threads), "-q")[0] == 0
        assert (tmp_path / f"{backend}1.cdl").read_bytes() == (tmp_path / f"{backend}2.cdl").read_bytes()
    one = (tmp_path / "t1.cdl").read_bytes()
    assert one == (tmp_path / "t2.cdl").read_bytes() == (tmp_path / "t3.cdl").read_bytes()


def test_decode_output_is_the_same_on_any_thread_count(model, tmp_path, cli):
    assert cli("encode", model, "-o", tmp_path / "m.cdl", "--backend", "cabac", "--threads", "1", "-q")[0] == 0
    for threads in (1, 2):
        assert cli("decode", tmp_path / "m.cdl", "-o", tmp_path / f"d{threads}.safetensors",
                       "--threads", str(threads), "-q")[0] == 0
    assert (tmp_path / "d1.safetensors").read_bytes() == (tmp_path / "d2.safetensors").read_bytes()
    whole = codec.decode_container(str(tmp_path / "m.cdl"), threads=1)
    streamed = list(read_safetensors_tensors(str(tmp_path / "d2.safetensors")))
    assert [r.name for r in whole.records] == [n for n, _, _ in streamed]
    for record, (_, array, dtype) in zip(whole.records, streamed):
        assert record.dtype == dtype and np.array_equal(record.array, array)


def test_channel_quantization_by_row_blocks_is_the_one_piece_result(monkeypatch):
    rng = np.random.default_rng(3)
    w = from_float64(rng.laplace(0, 0.02, (37, 41)) * np.linspace(0.5, 3, 37)[:, None], "bfloat16")
    record = codec.TensorRecord("w", w, "bfloat16")
    quantizer = make("channel", rel_step=0.02)
    whole = codec._quantize(quantizer, record, "auto")
    monkeypatch.setattr(codec, "QUANTIZE_BLOCK_ELEMENTS", 5 * 41 + 3)  # blocks of 5 rows, the last of 2
    assert codec._rows_independent(quantizer, record)
    blocks = codec._quantize(quantizer, record, "auto")
    assert np.array_equal(blocks[0], whole[0]) and blocks[1] == whole[1]
    w[4, 7] = np.uint16(0x7FC0)  # NaN in the first block: refused by name, as in one piece
    with pytest.raises(CdlInputError, match="tensor 'w' holds NaN"):
        codec._quantize(quantizer, record, "auto")


def test_encode_maps_each_tensor_when_it_reaches_it_and_writes_it_before_the_next(model, tmp_path, monkeypatch):
    events = []
    mapped, added = safetensors_file._mapped, ContainerWriter.add_tensor
    monkeypatch.setattr(safetensors_file, "_mapped", lambda *a: events.append("read") or mapped(*a))
    monkeypatch.setattr(ContainerWriter, "add_tensor", lambda self, e, p: events.append("write") or added(self, e, p))
    records = read_model(str(model)).records
    assert all(isinstance(r, LazyTensorRecord) for r in records) and events == []  # the header only
    encode_records(records, str(tmp_path / "m.cdl"), EncodeOptions(quantizer=make("uniform"), quiet=True, threads=1))
    assert events == ["read", "write"] * len(records)


def test_decode_writes_each_tensor_before_decoding_the_next(model, tmp_path, monkeypatch):
    cdlcodec.encode(model, tmp_path / "m.cdl", quantizer="uniform")
    events = []
    decoded, add = codec.decoded_record, SafetensorsWriter.add
    monkeypatch.setattr(codec, "decoded_record", lambda *a, **k: events.append("decode") or decoded(*a, **k))
    monkeypatch.setattr(SafetensorsWriter, "add", lambda self, r: events.append("write") or add(self, r))
    model_file = cdlcodec.decode(tmp_path / "m.cdl", tmp_path / "d.safetensors", threads=1)
    assert events == ["decode", "write"] * len(model_file.records)
    assert all(r.levels is None for r in model_file.records)  # no int64 levels kept for this writer


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    """32 float32 tensors of 1 MB: encode and decode hold a few of them, never the 32 MB model (nor the
    64 MB of its int64 levels, as decode did before)."""
    rng = np.random.default_rng(0)
    tensors = [(f"w{i}", rng.laplace(0, 0.02, (256, 1024)).astype(np.float32), "float32") for i in range(32)]
    write_safetensors_tensors(str(tmp_path / "m.safetensors"), tensors)
    del tensors
    tensor_bytes = 256 * 1024 * 4
    cdlcodec.encode(tmp_path / "m.safetensors", tmp_path / "warm.cdl",
                    quantizer="uniform", backend="huffman")  # compiles the kernels outside the measurement
    for step in ("encode", "decode"):
        tracemalloc.start()
        try:
            if step == "encode":
                encode_records(read_model(str(tmp_path / "m.safetensors")).records, str(tmp_path / "m.cdl"),
                               EncodeOptions(quantizer=make("uniform"), backend="huffman", quiet=True, threads=1))
            else:
                cdlcodec.decode(tmp_path / "m.cdl", tmp_path / "d.safetensors", threads=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * tensor_bytes, (step, peak)


def test_ordered_map_keeps_the_order_bounds_the_window_and_reports_the_first_failure():
    in_flight, most = [0], [0]

    def prepare(item):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        return item

    def work(item):
        if item in (5, 7):
            raise ValueError(f"item {item}")
        return item * 10

    results = []
    with pytest.raises(ValueError, match="item 5"):
        for value in ordered_map(work, range(10), 3, prepare=prepare, size=lambda item: 1, budget=2):
            in_flight[0] -= 1
            results.append(value)
    assert results == [0, 10, 20, 30, 40] and most[0] <= 2  # the budget (2 elements) holds it below 3 threads
    assert list(ordered_map(work, [1, 2, 3, 4], 4, size=lambda item: 10 ** 9)) == [10, 20, 30, 40]  # a lone item starts


def test_safetensors_writer_refuses_a_wrong_or_missing_tensor_and_leaves_no_file(tmp_path):
    path = tmp_path / "out.safetensors"
    plan = [("a", "float32", (2,)), ("b", "int64", (1,))]
    writer = SafetensorsWriter(str(path), plan)
    with pytest.raises(CdlInputError, match="not the planned 'a'"):
        writer.add(codec.TensorRecord("b", np.zeros(1, np.int64), "int64"))
    with pytest.raises(CdlInputError, match="missing tensor 'a'"):
        writer.close()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(str(path), plan) as w:
            w.add(codec.TensorRecord("a", np.ones(2, np.float32), "float32"))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with SafetensorsWriter(str(path), plan) as w:
        w.add(codec.TensorRecord("a", np.ones(2, np.float32), "float32"))
        w.add(codec.TensorRecord("b", np.array([7]), "int64"))
    write_safetensors_tensors(str(tmp_path / "whole.safetensors"), [("a", np.ones(2, np.float32), "float32"),
                                                                    ("b", np.array([7]), "int64")])
    assert path.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_load_into_fills_the_module_tensor_by_tensor_and_checks_before_changing_it(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cdlcodec.encode(net, tmp_path / "m.cdl", quantizer="uniform")
    expected = cdlcodec.load(str(tmp_path / "m.cdl"))
    calls = []
    load_state_dict = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda self, state, strict=True: calls.append(list(state)) or load_state_dict(self, state, strict))
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert cdlcodec.load_into(fresh, str(tmp_path / "m.cdl"), threads=2) is fresh
    assert calls == [[name] for name in expected]  # one tensor at a time
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name])
    other = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CdlInputError, match=r"do not fit the module: size mismatch: 2.weight \(4, 16\) for \(5, 16\)"):
        cdlcodec.load_into(other, str(tmp_path / "m.cdl"))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing was loaded


def test_torch_checkpoints_are_read_lazily_with_the_same_result(model, tmp_path):
    torch = pytest.importorskip("torch")
    state = {}
    for name, array, dtype in _tensors():
        tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16) if dtype == "bfloat16" \
            else torch.from_numpy(array.copy())
        state[name] = tensor
    torch.save(state, tmp_path / "m.pt")
    records = read_model(str(tmp_path / "m.pt")).records
    assert all(isinstance(r, LazyTensorRecord) for r in records)
    for record, (name, array, dtype) in zip(records, _tensors()):
        assert (record.name, record.dtype, record.shape) == (name, dtype, array.shape)
        assert np.array_equal(record.array, array)
        record.release()  # drops the pages of the mapped file: the values are read again from it
        assert np.array_equal(record.array, array)
    cdlcodec.encode(tmp_path / "m.pt", tmp_path / "pt.cdl", quantizer="uniform")
    cdlcodec.encode(model, tmp_path / "st.cdl", quantizer="uniform")
    with open_container(str(tmp_path / "pt.cdl")) as a, open_container(str(tmp_path / "st.cdl")) as b:
        for x, y in zip(iter_decoded(a), iter_decoded(b)):
            assert x.name == y.name and np.array_equal(x.array, y.array)


def test_a_quantizer_with_state_runs_in_file_order_on_the_callers_thread(model, tmp_path):
    """Only pure per-tensor quantizers (uniform, channel) quantize on the coding threads; any other sees
    the tensors one after another on the caller's thread, so its state cannot depend on timing."""
    import threading

    from cdlcodec.quantizers.rd import RDQuantizer

    seen = []

    class Recording(RDQuantizer):
        def quantize_record(self, record, values64, w32, backend):
            seen.append((record.name, threading.current_thread() is threading.main_thread()))
            return super().quantize_record(record, values64, w32, backend)

    records = read_model(str(model)).records
    encode_records(records, str(tmp_path / "m.cdl"), EncodeOptions(quantizer=Recording(), quiet=True, threads=2))
    assert seen == [(r.name, True) for r in records if r.dtype != "int64" and len(r.shape) >= 2]
