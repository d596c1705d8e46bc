"""End-to-end command line: encode -> info -> decode, and clean errors for bad input."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from cdlcodec.cli.main import main


def call(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def expected_value(w: torch.Tensor, step: float) -> torch.Tensor:
    """What a quantized tensor must decode to: round(w/step)*step, rounded to w's dtype."""
    k = np.rint(w.double().numpy() / step)
    return torch.from_numpy(k * step).to(torch.float32).to(w.dtype)


@pytest.mark.parametrize("backend", ["auto", "raw", "huffman", "cabac"])
@pytest.mark.parametrize("out_ext", [".pt", ".safetensors"])
def test_round_trip_reproduces_quantized_and_exact_values(tmp_path, capsys, state_dict_file, small_state_dict, backend, out_ext):
    cdl = tmp_path / "m.cdl"
    code, out, err = call(capsys, "encode", state_dict_file, "-o", cdl, "--rel-step", "0.1", "--backend", backend)
    assert code == 0, err
    code, out, err = call(capsys, "info", cdl, "--json")
    assert code == 0, err
    info = json.loads(out)
    steps = {t["name"]: t["step"] for t in info["tensors"]}
    restored_path = tmp_path / f"r{out_ext}"
    code, out, err = call(capsys, "decode", cdl, "-o", restored_path)
    assert code == 0, err
    if out_ext == ".pt":
        restored = torch.load(restored_path, weights_only=True)
    else:
        from safetensors.torch import load_file  # the reference implementation reads our file

        restored = load_file(str(restored_path))
    assert list(restored) == list(small_state_dict)
    for name, w in small_state_dict.items():
        r = restored[name]
        assert r.dtype == w.dtype and r.shape == w.shape, name
        if w.is_floating_point() and w.dim() >= 2:
            std = float(np.std(w.float().numpy(), dtype=np.float32))
            assert steps[name] == pytest.approx(float(np.float32(0.1) * np.float32(std)), rel=1e-7)
            assert torch.equal(r, expected_value(w, steps[name])), name
        else:
            assert steps[name] is None
            assert torch.equal(r, w), name


def test_info_json_fields(tmp_path, capsys, state_dict_file, small_state_dict):
    cdl = tmp_path / "m.cdl"
    assert call(capsys, "encode", state_dict_file, "-o", cdl, "-q")[0] == 0
    code, out, _ = call(capsys, "info", cdl, "--json")
    info = json.loads(out)
    n = sum(t.numel() for t in small_state_dict.values())
    nq = sum(t.numel() for t in small_state_dict.values() if t.is_floating_point() and t.dim() >= 2)
    assert info["format_version"] == "1.0"
    assert info["total_bytes"] == os.path.getsize(cdl)
    assert info["num_params"] == n and info["num_quantized_params"] == nq
    assert info["bits_per_param"] == pytest.approx(8 * os.path.getsize(cdl) / n)
    by_name = {t["name"]: t for t in info["tensors"]}
    assert set(by_name) == set(small_state_dict)
    for name, t in by_name.items():
        assert set(t) >= {"name", "shape", "dtype", "backend", "step", "bytes", "bits_per_param"}
        assert t["shape"] == list(small_state_dict[name].shape)
    assert by_name["fc.weight"]["dtype"] == "float16" and by_name["emb.weight"]["dtype"] == "bfloat16"
    code, out, _ = call(capsys, "info", cdl)  # the table form names every tensor
    assert code == 0 and all(name in out for name in small_state_dict)


def test_absolute_step_and_bits(tmp_path, capsys, state_dict_file, small_state_dict):
    cdl = tmp_path / "m.cdl"
    assert call(capsys, "encode", state_dict_file, "-o", cdl, "--step", "0.01", "-q")[0] == 0
    assert call(capsys, "decode", cdl, "-o", tmp_path / "r.pt", "-q")[0] == 0
    r = torch.load(tmp_path / "r.pt", weights_only=True)
    assert torch.equal(r["conv.weight"], expected_value(small_state_dict["conv.weight"], 0.01))
    assert call(capsys, "encode", state_dict_file, "-o", cdl, "--bits", "4", "-q")[0] == 0
    code, out, _ = call(capsys, "info", cdl, "--json")
    w = small_state_dict["conv.weight"]
    step = next(t["step"] for t in json.loads(out)["tensors"] if t["name"] == "conv.weight")
    assert step == pytest.approx(float(w.abs().max()) / 7)
    assert call(capsys, "decode", cdl, "-o", tmp_path / "r.pt", "-q")[0] == 0
    levels = torch.load(tmp_path / "r.pt", weights_only=True)["conv.weight"].double() / step
    assert levels.round().abs().max() <= 7


def test_keep_stores_matching_tensors_losslessly(tmp_path, capsys, state_dict_file, small_state_dict):
    cdl = tmp_path / "m.cdl"
    assert call(capsys, "encode", state_dict_file, "-o", cdl, "--keep", "conv.*", "-q")[0] == 0
    assert call(capsys, "decode", cdl, "-o", tmp_path / "r.pt", "-q")[0] == 0
    r = torch.load(tmp_path / "r.pt", weights_only=True)
    assert torch.equal(r["conv.weight"], small_state_dict["conv.weight"])
    assert not torch.equal(r["fc.weight"], small_state_dict["fc.weight"])


def test_checkpoint_wrappers_and_safetensors_input(tmp_path, capsys, small_state_dict):
    from safetensors.torch import save_file

    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
    wrapped = [{"state_dict": small_state_dict, "epoch": 3}, {"model": small_state_dict},
               {"step": 7, "model_state": small_state_dict, "optimizer_state": optimizer},  # Resemblyzer's layout
               {"generator": small_state_dict, "optimizer": optimizer}]                  # the only one with tensors
    for i, obj in enumerate(wrapped):
        torch.save(obj, tmp_path / f"w{i}.pt")
        assert call(capsys, "encode", tmp_path / f"w{i}.pt", "-o", tmp_path / f"w{i}.cdl", "-q")[0] == 0
        assert call(capsys, "decode", tmp_path / f"w{i}.cdl", "-o", tmp_path / f"w{i}.dec.pt", "-q")[0] == 0
        assert set(torch.load(tmp_path / f"w{i}.dec.pt", weights_only=True)) == set(small_state_dict)
    torch.save({"generator": small_state_dict, "discriminator": small_state_dict}, tmp_path / "two.pt")
    code, _, err = call(capsys, "encode", tmp_path / "two.pt", "-o", tmp_path / "two.cdl")
    assert code != 0 and "'generator', 'discriminator'" in err and not (tmp_path / "two.cdl").exists()
    st = {k: v.contiguous() for k, v in small_state_dict.items()}
    save_file(st, str(tmp_path / "m.safetensors"))
    assert call(capsys, "encode", tmp_path / "m.safetensors", "-o", tmp_path / "s.cdl", "-q")[0] == 0
    assert call(capsys, "decode", tmp_path / "s.cdl", "-o", tmp_path / "s.pt", "-q")[0] == 0
    assert call(capsys, "decode", tmp_path / "w0.cdl", "-o", tmp_path / "w.pt", "-q")[0] == 0
    a = torch.load(tmp_path / "s.pt", weights_only=True)
    b = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in small_state_dict)


def test_encoder_is_deterministic(tmp_path, capsys, state_dict_file):
    for name in ("a.cdl", "b.cdl"):
        assert call(capsys, "encode", state_dict_file, "-o", tmp_path / name, "-q")[0] == 0
    assert (tmp_path / "a.cdl").read_bytes() == (tmp_path / "b.cdl").read_bytes()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/cdlcodec-pwned",))


def _bad_inputs(tmp_path, state_dict_file):
    good = tmp_path / "good.cdl"
    assert main_ok(["encode", state_dict_file, "-o", good, "-q"])
    data = good.read_bytes()
    (tmp_path / "trunc.cdl").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[40] ^= 1
    (tmp_path / "flip.cdl").write_bytes(bytes(flipped))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    torch.save({"a": 1, "b": "x"}, tmp_path / "notensors.pt")
    torch.save({"w": torch.zeros(2, 2, dtype=torch.complex64)}, tmp_path / "complex.pt")
    return {
        "missing input": (["encode", tmp_path / "nope.pt", "-o", tmp_path / "o.cdl"], "no such file"),
        "directory input": (["encode", tmp_path, "-o", tmp_path / "o.cdl"], "directory|extension"),
        "unknown extension": (["encode", good, "-o", tmp_path / "o.cdl"], "extension"),
        "garbage checkpoint": (["encode", tmp_path / "garbage.pt", "-o", tmp_path / "o.cdl"], "not a readable torch checkpoint"),
        "pickle with code": (["encode", tmp_path / "evil.pt", "-o", tmp_path / "o.cdl"], "refused|not a readable"),
        "no tensors": (["encode", tmp_path / "notensors.pt", "-o", tmp_path / "o.cdl"], "no state_dict"),
        "complex dtype": (["encode", tmp_path / "complex.pt", "-o", tmp_path / "o.cdl"], "unsupported dtype"),
        "empty safetensors": (["encode", tmp_path / "empty.safetensors", "-o", tmp_path / "o.cdl"], "not a valid .safetensors"),
        "unknown backend": (["encode", state_dict_file, "-o", tmp_path / "o.cdl", "--backend", "zip"], "unknown backend"),
        "two step rules": (["encode", state_dict_file, "-o", tmp_path / "o.cdl", "--step", "1", "--bits", "4"], "choose one"),
        "negative step": (["encode", state_dict_file, "-o", tmp_path / "o.cdl", "--step", "-1"], "positive"),
        "nan rel-step": (["encode", state_dict_file, "-o", tmp_path / "o.cdl", "--rel-step", "nan"], "positive"),
        "bits out of range": (["encode", state_dict_file, "-o", tmp_path / "o.cdl", "--bits", "1"], "between"),
        "truncated container": (["decode", tmp_path / "trunc.cdl", "-o", tmp_path / "o.pt"], "truncated|damaged"),
        "flipped container": (["decode", tmp_path / "flip.cdl", "-o", tmp_path / "o.pt"], "checksum|corrupt"),
        "not a container": (["info", state_dict_file], "bad magic"),
        "unknown output kind": (["decode", good, "-o", tmp_path / "o.txt"], "extension"),
        "missing container": (["info", tmp_path / "nope.cdl"], "No such file"),
    }


def main_ok(args):
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code == 0
    return True


def test_bad_input_gives_one_clean_error_line(tmp_path, capsys, state_dict_file):
    cases = _bad_inputs(tmp_path, state_dict_file)
    capsys.readouterr()
    for label, (args, message) in cases.items():
        code, out, err = call(capsys, *args)
        assert code != 0, label
        assert "Traceback" not in err, label
        assert err.startswith("cdlcodec: error:") and err.count("\n") == 1, (label, err)
        import re

        assert re.search(message, err), (label, err)
        assert not (tmp_path / "o.cdl").exists() and not (tmp_path / "o.pt").exists(), label
    assert not os.path.exists("/tmp/cdlcodec-pwned")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_real_entry_point_and_module_agree(tmp_path, state_dict_file, run_cli):
    r = run_cli("--help")
    assert r.returncode == 0 and "encode" in r.stdout and "decode" in r.stdout and "info" in r.stdout
    r = run_cli("decode", tmp_path / "missing.cdl", "-o", tmp_path / "x.pt")
    assert r.returncode == 2 and r.stderr.startswith("cdlcodec: error:") and "Traceback" not in r.stderr


def test_exit_status_of_a_command_that_calls_ctx_exit(capsys, tmp_path):
    """A command that ends with ctx.exit(1) must make the process exit 1, not 0."""
    import click

    from cdlcodec.cli import main as main_module

    @click.command("failing")
    @click.pass_context
    def failing(ctx):
        ctx.exit(1)

    original = main_module._LazyGroup.get_command
    main_module._LazyGroup.get_command = lambda self, ctx, name: failing if name == "failing" else original(self, ctx, name)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["failing"])
    finally:
        main_module._LazyGroup.get_command = original
    assert exc.value.code == 1
