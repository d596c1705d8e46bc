"""Issue 15 item 6: part containers (disjoint tensor groups, encoded separately) joined into one
container without re-coding (cdlcodec.formats.concat_containers and `cdlcodec concat`)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from cdlcodec.api import encode
from cdlcodec.cli.main import main
from cdlcodec.codec import decode_container
from cdlcodec.errors import CdlFormatError, CdlInputError
from cdlcodec.formats import ContainerReader, ContainerWriter, TensorEntry, concat_containers
from cdlcodec.formats.container import END_MAGIC, FOOTER, PREFIX


def _model(n_layers=6):
    rng = np.random.default_rng(0)
    model = {}
    for i in range(n_layers):
        model[f"layers.{i}.weight"] = (rng.standard_normal((24, 16)) * 0.1).astype(np.float32)
        model[f"layers.{i}.bias"] = rng.standard_normal(24).astype(np.float32)
    model["head.weight"] = rng.standard_normal((10, 24)).astype(np.float16)
    model["steps"] = np.arange(5, dtype=np.int64)
    return model


def _encode_in_parts(tmp_path, model, n_parts=3, **options):
    names = list(model)
    groups = [names[i::n_parts] for i in range(n_parts)]  # interleaved, so order matters below
    order = [n for g in groups for n in g]
    parts = []
    for k, group in enumerate(groups):
        path = tmp_path / f"part{k}.cdl"
        encode({n: model[n] for n in group}, path, **options)
        parts.append(path)
    return parts, order


def _plain_part(path, tensors, metadata=None, sections=()):
    with ContainerWriter(path, metadata or {}) as writer:
        for name, kind, data in sections:
            writer.add_section(name, kind, data)
        for name, arr in tensors.items():
            writer.add_tensor(TensorEntry(name, arr.shape, str(arr.dtype), "plain", None, None, b"", arr.size),
                              arr.tobytes())


@pytest.mark.parametrize("options", [{"quantizer": "uniform"}, {"lossless": True}])
def test_three_parts_concatenate_to_what_a_single_pass_writes(tmp_path, options):
    model = _model()
    parts, order = _encode_in_parts(tmp_path, model, **options)
    whole = tmp_path / "whole.cdl"
    result = concat_containers(parts, whole)
    assert (result.num_parts, result.num_tensors) == (3, len(model))

    single = tmp_path / "single.cdl"
    encode({n: model[n] for n in order}, single, **options)  # the same tensors in the same order, one pass
    joined, one_pass = decode_container(str(whole)), decode_container(str(single))
    assert [r.name for r in joined.records] == order
    for a, b in zip(joined.records, one_pass.records):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.array, b.array)
    with ContainerReader(whole) as r_whole, ContainerReader(single) as r_single:
        assert r_whole.metadata == r_single.metadata
        for a, b in zip(r_whole.tensors, r_single.tensors):
            assert r_whole.read_payload(a) == r_single.read_payload(b)  # the encoder is deterministic per tensor
            assert (a.quant, a.backend, a.backend_params, a.crc32) == (b.quant, b.backend, b.backend_params, b.crc32)
    assert whole.read_bytes() == single.read_bytes()  # same tensors, order and metadata: the same file


def test_payloads_are_streamed_not_read_whole(tmp_path, monkeypatch):
    big = np.arange(600_000, dtype=np.float32)  # 2.4 MB: several 1 MiB blocks
    _plain_part(tmp_path / "a.cdl", {"big": big})
    _plain_part(tmp_path / "b.cdl", {"small": np.ones(3, np.float32)}, sections=[("cfg", "json", b"{}")])

    def whole_payload(*args):
        raise AssertionError("concat read a whole payload")

    monkeypatch.setattr(ContainerReader, "read_payload", whole_payload)
    monkeypatch.setattr(ContainerReader, "read_section", whole_payload)
    concat_containers([tmp_path / "a.cdl", tmp_path / "b.cdl"], tmp_path / "ab.cdl")
    monkeypatch.undo()
    with ContainerReader(tmp_path / "ab.cdl") as reader:
        reader.check_checksums()
        assert [s.name for s in reader.sections] == ["cfg"]
        assert reader.sections[0].offset == 0  # sections first, as a single writer emits them
        assert np.array_equal(np.frombuffer(reader.read_payload(reader.tensor("big")), np.float32), big)


def test_identical_sections_are_kept_once_and_different_ones_refused(tmp_path):
    config = b'{"hidden_size": 16}'
    _plain_part(tmp_path / "a.cdl", {"a": np.zeros(2, np.float32)}, sections=[("config", "json", config)])
    _plain_part(tmp_path / "b.cdl", {"b": np.ones(2, np.float32)}, sections=[("config", "json", config)])
    _plain_part(tmp_path / "c.cdl", {"c": np.ones(2, np.float32)}, sections=[("config", "json", b'{"hidden_size": 17}')])
    result = concat_containers([tmp_path / "a.cdl", tmp_path / "b.cdl"], tmp_path / "ab.cdl")
    assert result.num_sections == 1
    with pytest.raises(CdlInputError, match="section 'config' differs between parts .*a.cdl and .*c.cdl"):
        concat_containers([tmp_path / "a.cdl", tmp_path / "c.cdl"], tmp_path / "ac.cdl")
    assert not (tmp_path / "ac.cdl").exists()


def test_duplicate_tensor_names_are_refused(tmp_path):
    _plain_part(tmp_path / "a.cdl", {"w": np.zeros(2, np.float32)})
    _plain_part(tmp_path / "b.cdl", {"w": np.ones(2, np.float32)})
    with pytest.raises(CdlInputError, match="tensor 'w' is in two parts: .*a.cdl and .*b.cdl"):
        concat_containers([tmp_path / "a.cdl", tmp_path / "b.cdl"], tmp_path / "ab.cdl")
    assert not (tmp_path / "ab.cdl").exists()


def test_conflicting_metadata_needs_a_chosen_value(tmp_path):
    _plain_part(tmp_path / "a.cdl", {"a": np.zeros(2, np.float32)}, {"quantizer": "uniform 0.1", "only.a": "1"})
    _plain_part(tmp_path / "b.cdl", {"b": np.zeros(2, np.float32)}, {"quantizer": "uniform 0.2"})
    parts = [tmp_path / "a.cdl", tmp_path / "b.cdl"]
    with pytest.raises(CdlInputError, match="parts disagree on metadata 'quantizer'"):
        concat_containers(parts, tmp_path / "ab.cdl")
    concat_containers(parts, tmp_path / "ab.cdl", metadata={"quantizer": "uniform, per part"})
    with ContainerReader(tmp_path / "ab.cdl") as reader:
        assert reader.metadata == {"quantizer": "uniform, per part", "only.a": "1"}


def test_a_corrupt_part_payload_leaves_no_output(tmp_path):
    _plain_part(tmp_path / "a.cdl", {"a": np.arange(8, dtype=np.float32)})
    data = bytearray((tmp_path / "a.cdl").read_bytes())
    data[PREFIX.size + 3] ^= 0x40  # inside the payload: the index checksum still holds
    (tmp_path / "bad.cdl").write_bytes(bytes(data))
    with pytest.raises(CdlFormatError, match="part .*bad.cdl: checksum mismatch in the payload of tensor 'a'"):
        concat_containers([tmp_path / "bad.cdl"], tmp_path / "out.cdl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cdl", "bad.cdl"]


def _with_minor(path, minor):
    """The container at `path` relabelled as format 1.`minor`, checksum fixed."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 10, minor)
    index_offset, index_length, _, _, _ = FOOTER.unpack(data[-FOOTER.size:])
    index = bytes(data[index_offset:index_offset + index_length])
    crc = zlib.crc32(bytes(data[:PREFIX.size]) + index + struct.pack("<QQ", index_offset, index_length))
    data[-FOOTER.size:] = FOOTER.pack(index_offset, index_length, crc, 0, END_MAGIC)
    path.write_bytes(bytes(data))


def test_a_part_of_a_newer_minor_version_is_refused(tmp_path):
    _plain_part(tmp_path / "a.cdl", {"a": np.zeros(2, np.float32)})
    _plain_part(tmp_path / "b.cdl", {"b": np.zeros(2, np.float32)})
    _with_minor(tmp_path / "b.cdl", 7)
    with ContainerReader(tmp_path / "b.cdl") as reader:
        assert reader.version == (1, 7)  # readable: newer minor versions only add optional fields
    with pytest.raises(CdlInputError, match=r"part .*b.cdl is format 1.7, newer than this writer's 1.2"):
        concat_containers([tmp_path / "a.cdl", tmp_path / "b.cdl"], tmp_path / "ab.cdl")


def test_the_output_takes_the_lowest_version_that_describes_it(tmp_path):
    model = {"w": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32),
             "n": np.arange(4, dtype=np.int64)}
    encode({"w": model["w"]}, tmp_path / "exact.cdl", lossless=True)
    encode({"n": model["n"]}, tmp_path / "plain.cdl", lossless=True)
    with ContainerReader(tmp_path / "exact.cdl") as a, ContainerReader(tmp_path / "plain.cdl") as b:
        assert (a.version, b.version) == ((1, 1), (1, 0))
    concat_containers([tmp_path / "plain.cdl"], tmp_path / "one.cdl")
    concat_containers([tmp_path / "plain.cdl", tmp_path / "exact.cdl"], tmp_path / "both.cdl")
    with ContainerReader(tmp_path / "one.cdl") as one, ContainerReader(tmp_path / "both.cdl") as both:
        assert (one.version, both.version) == ((1, 0), (1, 1))
    assert (tmp_path / "one.cdl").read_bytes() == (tmp_path / "plain.cdl").read_bytes()


def test_the_output_is_never_a_part(tmp_path):
    _plain_part(tmp_path / "a.cdl", {"a": np.zeros(2, np.float32)})
    before = (tmp_path / "a.cdl").read_bytes()
    with pytest.raises(CdlInputError, match="is the part"):
        concat_containers([tmp_path / "a.cdl"], tmp_path / "a.cdl")
    with pytest.raises(CdlInputError, match="at least one part"):
        concat_containers([], tmp_path / "x.cdl")
    assert (tmp_path / "a.cdl").read_bytes() == before


def _cli(args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def test_cli_concat(tmp_path, capsys):
    model = _model(3)
    parts, order = _encode_in_parts(tmp_path, model, quantizer="uniform")
    assert _cli(["concat", *parts, "-o", tmp_path / "whole.cdl"]) == 0
    assert f"3 parts -> {tmp_path / 'whole.cdl'}: {len(model)} tensors, 0 sections" in capsys.readouterr().out
    assert [r.name for r in decode_container(str(tmp_path / "whole.cdl")).records] == order

    assert _cli(["concat", parts[0], parts[0], "-o", tmp_path / "twice.cdl"]) == 2
    assert "cdlcodec: error: tensor 'layers.0.weight' is in two parts" in capsys.readouterr().err
    assert _cli(["concat", parts[0], tmp_path / "missing.cdl", "-o", tmp_path / "m.cdl"]) == 2
    assert "cdlcodec: error: part " in capsys.readouterr().err
    assert _cli(["concat", parts[0], "--metadata", "novalue", "-o", tmp_path / "m.cdl"]) == 2
    assert "--metadata takes KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "twice.cdl").exists() and not (tmp_path / "m.cdl").exists()


def test_a_sharded_checkpoint_encoded_shard_by_shard_decodes_to_its_folder(tmp_path):
    """The docs/scale.md recipe: one task per shard, a sections-only part with the layout, concat."""
    from test_sharded import _checkpoint, _shards

    from cdlcodec.api import decode
    from cdlcodec.io.sharded import read_sharded

    src = _checkpoint(tmp_path / "model")
    layout = read_sharded(str(src))  # reads the shard headers and the small files, not the weights
    with ContainerWriter(tmp_path / "part-layout.cdl") as writer:
        for name, kind, data in layout.sections:
            writer.add_section(name, kind, data)
    parts = [tmp_path / "part-layout.cdl"]
    for k, shard in enumerate(sorted(_shards())):  # each of these could run on another machine
        encode(str(src / shard), tmp_path / f"part-{k}.cdl", lossless=True)
        parts.append(tmp_path / f"part-{k}.cdl")
    concat_containers(parts, tmp_path / "whole.cdl", metadata={"source.kind": "safetensors.sharded"})

    decode(tmp_path / "whole.cdl", tmp_path / "restored")
    for name in sorted(src.iterdir()):
        if name.name in ("tokenizer.model", "modeling_custom.py", ".gitattributes"):
            continue  # not carried (binary or code)
        assert (tmp_path / "restored" / name.name).read_bytes() == name.read_bytes(), name.name
