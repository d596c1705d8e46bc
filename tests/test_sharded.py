"""Issue 15 item 4: sharded safetensors checkpoints as model hubs publish them (a folder of
model-0000k-of-0000n.safetensors shards, model.safetensors.index.json, config and tokenizer files)
encode into one .cdl and decode back to the same folder, or to one .safetensors file."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cdlcodec.api import decode, encode
from cdlcodec.cli.main import main
from cdlcodec.codec import decode_container
from cdlcodec.errors import CdlFormatError, CdlInputError
from cdlcodec.formats import ContainerReader, ContainerWriter
from cdlcodec.io.safetensors_file import read_safetensors_tensors, write_safetensors_tensors
from cdlcodec.io.sharded import FILE_PREFIX, LAYOUT_SECTION, read_sharded, write_sharded
from cdlcodec.records import ModelFile, TensorRecord

INDEX = "model.safetensors.index.json"


def _bf16(a):
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bit patterns


def _shards():
    rng = np.random.default_rng(0)
    special = np.array([np.nan, -0.0, np.inf, 1e-45, -3.5], np.float32)  # bit patterns a lossy path would lose
    return {
        "model-00001-of-00003.safetensors": {
            "model.embed_tokens.weight": (_bf16(rng.standard_normal((64, 32))), "bfloat16"),
            "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((32, 32)).astype(np.float16), "float16"),
        },
        "model-00002-of-00003.safetensors": {
            "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((48, 32)).astype(np.float32), "float32"),
            "model.layers.0.input_layernorm.weight": (special, "float32"),
            "model.layers.1.mlp.up_proj.weight": (rng.standard_normal((48, 32)).astype(np.float32), "float32"),
        },
        "model-00003-of-00003.safetensors": {
            "lm_head.weight": (_bf16(rng.standard_normal((64, 32))), "bfloat16"),
            "model.position_ids": (np.arange(16, dtype=np.int64), "int64"),
        },
    }


def _checkpoint(folder, shards=None, carried=True):
    """A folder the way `save_pretrained` leaves it (tensor order in a shard is not name order)."""
    folder.mkdir()
    shards = shards or _shards()
    weight_map, total = {}, 0
    for file_name, tensors in shards.items():
        write_safetensors_tensors(str(folder / file_name), [(n, a, d) for n, (a, d) in tensors.items()], {"format": "pt"})
        weight_map.update({n: file_name for n in tensors})
        total += sum(a.nbytes for a, _ in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if carried:
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 32}\n')
        (folder / "generation_config.json").write_text('{"do_sample": true}')
        (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ bos_token }}"}')
        (folder / "README.md").write_text("# a model card\n")
        (folder / "tokenizer.model").write_bytes(b"\x0a\x80\xff binary sentencepiece")  # binary: not carried
        (folder / "modeling_custom.py").write_text("print('code is not carried')\n")
        (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return folder


def _layout_of(folder):
    return {f: [name for name, _, _ in read_safetensors_tensors(str(folder / f))]
            for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}


@pytest.mark.parametrize("source", ["folder", "index file"])
def test_lossless_round_trip_restores_the_folder_bit_for_bit(tmp_path, source):
    src = _checkpoint(tmp_path / "model")
    cdl, out = tmp_path / "m.cdl", tmp_path / "restored"
    encode(src if source == "folder" else src / INDEX, cdl, lossless=True)
    decode(cdl, out)

    carried = ["README.md", "config.json", "generation_config.json", INDEX, "tokenizer_config.json"]
    shard_files = sorted(_shards())
    assert sorted(os.listdir(out)) == sorted(carried + shard_files)
    for name in carried + shard_files:  # lossless: every byte, NaN payloads and -0.0 included
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert _layout_of(out) == _layout_of(src)
    with ContainerReader(cdl) as reader:
        assert reader.metadata["source.kind"] == "safetensors.sharded"
        layout = json.loads(reader.read_section(reader.section(LAYOUT_SECTION)))
    assert layout["not_carried"] == [".gitattributes", "modeling_custom.py", "tokenizer.model"]
    assert [s["metadata"] for s in layout["shards"]] == [{"format": "pt"}] * 3


def test_lossy_round_trip_keeps_the_shard_layout(tmp_path):
    src = _checkpoint(tmp_path / "model")
    encode(src, tmp_path / "m.cdl", quantizer="uniform")
    decode(tmp_path / "m.cdl", tmp_path / "out")
    assert _layout_of(tmp_path / "out") == _layout_of(src)
    assert (tmp_path / "out" / INDEX).read_bytes() == (src / INDEX).read_bytes()
    for file_name, tensors in _shards().items():
        got = {n: (a, d) for n, a, d in read_safetensors_tensors(str(tmp_path / "out" / file_name))}
        for name, (array, dtype) in tensors.items():
            assert got[name][1] == dtype and got[name][0].shape == array.shape


def test_decode_to_one_file(tmp_path):
    src = _checkpoint(tmp_path / "model")
    encode(src, tmp_path / "m.cdl", lossless=True)
    decode(tmp_path / "m.cdl", tmp_path / "merged.safetensors")
    merged = {n: (a, d) for n, a, d in read_safetensors_tensors(str(tmp_path / "merged.safetensors"))}
    expected = {n: t for tensors in _shards().values() for n, t in tensors.items()}
    assert list(merged) == list(expected)  # shard order, then each shard's order
    for name, (array, dtype) in expected.items():
        assert merged[name][1] == dtype
        assert merged[name][0].tobytes() == array.tobytes()


def test_cli_round_trip(tmp_path, capsys):
    src = _checkpoint(tmp_path / "model", carried=False)
    (tmp_path / "empty").mkdir()
    for out in [tmp_path / "empty", str(tmp_path / "new") + os.sep]:
        with pytest.raises(SystemExit) as exc:
            main(["encode", str(src), "-o", str(tmp_path / "m.cdl"), "--lossless", "-q"])
        assert exc.value.code == 0, capsys.readouterr().err
        with pytest.raises(SystemExit) as exc:
            main(["decode", str(tmp_path / "m.cdl"), "-o", str(out), "-q"])
        assert exc.value.code == 0, capsys.readouterr().err
        assert _layout_of(src) == _layout_of(tmp_path / os.path.basename(str(out).rstrip(os.sep)))


def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("cdlcodec: error: ") and "Traceback" not in err
    return err


def test_output_folder_must_be_new_or_empty_and_is_written_whole(tmp_path, capsys):
    src = _checkpoint(tmp_path / "model")
    encode(src, tmp_path / "m.cdl", lossless=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert "exists and is not an empty folder" in _cli_error(["decode", tmp_path / "m.cdl", "-o", tmp_path / "busy"], capsys)
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]
    # a container without a shard layout cannot become a folder
    encode({"w": np.ones((4, 4), np.float32)}, tmp_path / "plain.cdl", lossless=True)
    assert "holds no shard layout" in _cli_error(["decode", tmp_path / "plain.cdl", "-o", tmp_path / "f"], capsys)
    assert not (tmp_path / "f").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_broken_checkpoint_folders_are_refused(tmp_path, capsys):
    (tmp_path / "none").mkdir()
    assert "needs one *.safetensors.index.json" in _cli_error(["encode", tmp_path / "none", "-o", tmp_path / "o.cdl"], capsys)

    src = _checkpoint(tmp_path / "missing", carried=False)
    os.remove(src / "model-00002-of-00003.safetensors")
    assert "shard 'model-00002-of-00003.safetensors' is not a file" in _cli_error(
        ["encode", src, "-o", tmp_path / "o.cdl"], capsys)

    src = _checkpoint(tmp_path / "lying", carried=False)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    assert "holds tensor 'lm_head.weight', which the weight_map puts in 'model-00001-of-00003.safetensors'" in \
        _cli_error(["encode", src, "-o", tmp_path / "o.cdl"], capsys)

    index["weight_map"]["lm_head.weight"] = "../outside.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    assert "is not a plain file name" in _cli_error(["encode", src, "-o", tmp_path / "o.cdl"], capsys)
    (src / INDEX).write_text('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    assert "not valid JSON: duplicate key" in _cli_error(["encode", src / INDEX, "-o", tmp_path / "o.cdl"], capsys)
    assert not (tmp_path / "o.cdl").exists()


def _forged(path, layout, files=()):
    """A container with the tensors of `_shards()`'s first shard and a hostile layout section."""
    records = [TensorRecord(n, a, d) for n, (a, d) in _shards()["model-00001-of-00003.safetensors"].items()]
    with ContainerWriter(path) as writer:
        writer.add_section(LAYOUT_SECTION, "json", json.dumps(layout).encode())
        for name, data in files:
            writer.add_section(FILE_PREFIX + name, "bytes", data)
    sections = [(LAYOUT_SECTION, "json", json.dumps(layout).encode())] + [(FILE_PREFIX + n, "bytes", d) for n, d in files]
    return ModelFile(records, sections, {})


@pytest.mark.parametrize("layout, files, message", [
    ({"shards": [{"file": "../escape.safetensors", "metadata": {}, "tensors": ["model.embed_tokens.weight",
      "model.layers.0.self_attn.q_proj.weight"]}]}, (), "not a plain file name"),
    ({"shards": [{"file": "a.safetensors", "metadata": {}, "tensors": ["model.embed_tokens.weight",
      "model.layers.0.self_attn.q_proj.weight"]}]}, [("../../etc/cron.d/x", b"boom")], "not a plain file name"),
    ({"shards": [{"file": "a.safetensors", "metadata": {}, "tensors": ["model.embed_tokens.weight",
      "model.layers.0.self_attn.q_proj.weight"]}]}, [("a.safetensors", b"clash")], "has the name of a shard"),
    ({"shards": [{"file": "a.safetensors", "metadata": {}, "tensors": ["model.embed_tokens.weight"]},
                 {"file": "b.safetensors", "metadata": {}, "tensors": ["model.embed_tokens.weight"]}]}, (),
     "placed in two shards"),
    ({"shards": [{"file": "a.safetensors", "metadata": {"n": 1}, "tensors": []}]}, (), "a shard entry is not"),
    ({"shards": []}, (), "lists no shards"),
])
def test_hostile_layouts_write_nothing(tmp_path, layout, files, message):
    model = _forged(tmp_path / "x.cdl", layout, files)
    with pytest.raises((CdlFormatError, CdlInputError), match=message):
        write_sharded(str(tmp_path / "out"), model)
    assert sorted(os.listdir(tmp_path)) == ["x.cdl"]


def test_reader_output_is_ordered_by_shard_then_data(tmp_path):
    model = read_sharded(str(_checkpoint(tmp_path / "model")))
    assert [r.name for r in model.records] == [n for tensors in _shards().values() for n in tensors]
    assert [name for name, _, _ in model.sections] == [
        LAYOUT_SECTION, "file:README.md", "file:config.json", "file:generation_config.json", f"file:{INDEX}",
        "file:tokenizer_config.json"]
    assert [r.name for r in decode_container(_encoded(tmp_path, model)).records] == [r.name for r in model.records]


def _encoded(tmp_path, model):
    from cdlcodec.codec import EncodeOptions, encode_records

    encode_records(model.records, str(tmp_path / "r.cdl"), EncodeOptions(lossless=True, quiet=True),
                   model.metadata, model.sections)
    return str(tmp_path / "r.cdl")
