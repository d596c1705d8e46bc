"""The quantizer registry (quantizers.make / register), typed quant params, and the encode options
that used to be silently ignored (issue 12)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from cdlcodec.codec import EncodeOptions, container_summary, decode_container, encode_records
from cdlcodec.errors import CdlFormatError, CdlInputError
from cdlcodec.quantizers import Quantizer, dequantize, make, register
from cdlcodec.quantizers.params import ChannelParams, DependentParams, IntegerParams, UniformParams, from_json
from cdlcodec.records import TensorRecord


# A quantizer defined outside the package: its module plus one register() line is all it takes.
@dataclass(frozen=True)
class PowerOfTwoQuantizer(Quantizer):
    """Steps rounded to a power of two: level = round(w / 2^e), with e from max|w| and `bits`."""

    bits: int = 4

    def describe(self) -> str:
        return f"pow2 bits={self.bits}"

    def quantize(self, values64, w32):
        peak = float(np.max(np.abs(w32))) or 1.0
        step = 2.0 ** np.ceil(np.log2(peak / (2 ** (self.bits - 1) - 1)))
        return np.rint(values64 / step).astype(np.int64).ravel(), UniformParams(float(step)).to_json()


def test_a_quantizer_registered_from_a_test_module_encodes_and_decodes(tmp_path):
    register("pow2", PowerOfTwoQuantizer)
    w = (np.random.default_rng(0).standard_normal((8, 16)) * 0.3).astype(np.float32)
    path = tmp_path / "p.cdl"
    encode_records([TensorRecord("w", w, "float32")], str(path), EncodeOptions(make("pow2", bits=5), quiet=True))
    rec = decode_container(str(path)).records[0]
    step = rec.quant["step"]
    assert np.log2(step) == int(np.log2(step))  # a power of two
    assert np.max(np.abs(rec.array - w)) <= step / 2
    assert container_summary(str(path))["metadata"]["quantizer"] == "pow2 bits=5"
    with pytest.raises(CdlInputError, match="quantizer 'pow2'.*'step'"):
        make("pow2", step=0.1)  # not a step-rule quantizer: an unknown parameter is refused, not dropped


def test_make_checks_the_step_rule_once_and_names_parameters():
    assert make("uniform").rel_step == 0.1
    assert make("rd", bits=4, lam=0.2).describe() == "rd lambda=0.2 uniform bits=4"
    with pytest.raises(CdlInputError, match=r"choose one of rel_step, step, bits \(got step and bits\)") as err:
        make("trellis", step=1.0, bits=4)
    assert set(err.value.params) == {"rel_step", "step", "bits"}
    with pytest.raises(CdlInputError, match="^step must be a finite positive number") as err:
        make("channel", step=-1.0)
    assert err.value.params == ("step",) and "--" not in str(err.value)
    with pytest.raises(CdlInputError, match="^lam must be"):
        make("rd", lam=float("nan"))
    with pytest.raises(CdlInputError, match="unknown quantizer 'nope'"):
        make("nope")
    with pytest.raises(CdlInputError, match="quantizer 'uniform'"):
        make("uniform", lam=0.1)
    assert {"uniform", "channel", "rd", "trellis", "cpmf", "fidelity"} <= set(__import__(
        "cdlcodec.quantizers.base", fromlist=["names"]).names())


@pytest.mark.parametrize("quant, shape, dtype, params", [
    ({"scheme": "uniform", "step": 0.5}, (2, 3), "float32", UniformParams(0.5)),
    ({"scheme": "uniform", "axis": 0, "steps": [0.5, 0.25]}, (2, 3), "float32", ChannelParams(0, (0.5, 0.25))),
    ({"scheme": "integer"}, (4,), "int64", IntegerParams()),
    ({"scheme": "dependent", "step": 0.5, "states": 8}, (2, 3), "float32", DependentParams(8, 0.5)),
    ({"scheme": "dependent", "axis": 0, "steps": [0.5, 0.25], "states": 4}, (2, 3), "float16",
     DependentParams(4, None, 0, (0.5, 0.25))),
    ({"scheme": "uniform", "step": 0.5, "bits": 4, "alpha": 2.0, "source": "cdl"}, (2, 3), "float32",
     UniformParams(0.5, (("bits", 4), ("alpha", 2.0), ("source", "cdl")))),
])
def test_params_round_trip_to_the_same_json_bytes(quant, shape, dtype, params):
    assert from_json(quant, shape, dtype, "t") == params
    assert json.dumps(params.to_json()) == json.dumps(quant)  # key order too: the index bytes


@pytest.mark.parametrize("quant, dtype, message", [
    ({"scheme": "uniform", "step": float("inf")}, "float32", "finite positive"),
    ({"scheme": "uniform", "step": True}, "float32", "finite positive"),
    ({"scheme": "integer"}, "float32", "integer scheme needs an integer"),
    ({"scheme": "uniform", "step": 1.0}, "int32", "uniform quantization of a int32"),
    ({"scheme": "dependent", "step": 1.0, "states": 5}, "float32", "5 states"),
    ({"scheme": "uniform", "axis": 1, "steps": [1.0, 1.0]}, "float32", "do not match the shape"),
    ({"scheme": "lloyd"}, "float32", "unknown quantization scheme"),
])
def test_from_json_refuses_what_dequantize_refuses(quant, dtype, message):
    with pytest.raises(CdlFormatError, match=message):
        from_json(quant, (2, 3), dtype, "t")
    with pytest.raises(CdlFormatError, match=message):
        dequantize(np.zeros(6, np.int64), quant, (2, 3), dtype, "t")


def test_info_shows_per_channel_steps(tmp_path, cli):
    w = np.arange(1, 25, dtype=np.float32).reshape(4, 6)
    path = tmp_path / "c.cdl"
    encode_records([TensorRecord("w", w, "float32")], str(path), EncodeOptions(make("channel", step=0.5), quiet=True))
    info = container_summary(str(path))["tensors"][0]
    assert info["step"] is None and info["steps"] == {"axis": 0, "count": 4, "min": 0.5, "max": 0.5}
    code, out, _ = cli("info", path)
    assert code == 0 and "per-channel (4) 0.5-0.5" in out


def _torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cdl_checkpoint(tmp_path_factory):
    torch = _torch()
    from cdlcodec.cdl.checkpoint import cdl_state_dict
    from cdlcodec.cdl.train import TrainConfig, train_model
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.models import build

    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    torch.manual_seed(0)
    config = TrainConfig(mode="cdl", bits=4, epochs=1, batch_size=64, quiet=True)
    result = train_model(build("lenet5"), x_train[:64], y_train[:64], x_test[:32], y_test[:32], config)
    path = tmp_path_factory.mktemp("cdl") / "ckpt.pt"
    torch.save(cdl_state_dict(result.model, architecture="lenet5", bits=4, first_last_bits=8), path)
    return path


@pytest.mark.parametrize("options, flags", [(["--bits", "2"], "--bits"),
                                            (["--lambda", "1", "--trellis"], "--lambda and --trellis")])
def test_step_options_on_a_cdl_checkpoint_are_refused(cdl_checkpoint, tmp_path, cli, options, flags):
    code, _, err = cli("encode", cdl_checkpoint, "-o", tmp_path / "x.cdl", "-q", *options)
    assert code == 2 and err.startswith(f"cdlcodec: error: {flags} (")
    assert "cannot be used on a CDL / R-CDL checkpoint" in err and "--cpmf chooses how" in err
    assert not (tmp_path / "x.cdl").exists()
    assert cli("encode", cdl_checkpoint, "-o", tmp_path / "y.cdl", "-q", "--cpmf", "sample")[0] == 0


def test_cpmf_on_an_ordinary_checkpoint_is_refused(state_dict_file, tmp_path, cli):
    code, _, err = cli("encode", state_dict_file, "-o", tmp_path / "x.cdl", "-q", "--cpmf", "sample")
    assert code == 2 and err == ("cdlcodec: error: --cpmf (cdl cpmf=sample seed=0) applies to CDL / R-CDL "
                                 "checkpoints only, and this model is not one\n")
    with pytest.raises(CdlInputError, match="^cdl_quantizer"):  # the library names its parameter
        encode_records([TensorRecord("w", np.ones((2, 2), np.float32), "float32")], str(tmp_path / "y.cdl"),
                       EncodeOptions(cdl_quantizer=make("cpmf"), quiet=True))


def test_keep_pattern_that_matches_nothing_is_named(state_dict_file, tmp_path, cli):
    code, _, err = cli("encode", state_dict_file, "-o", tmp_path / "x.cdl", "-q", "--keep", "conv.*",
                       "--keep", "no_such_*")
    assert code == 0
    assert err == f"cdlcodec: warning: --keep 'no_such_*' matches no tensor of {state_dict_file}\n"


def test_library_errors_name_parameters_and_the_cli_names_flags(state_dict_file, tmp_path, cli):
    with pytest.raises(CdlInputError, match="^rel_step must be"):
        make("uniform", rel_step=float("nan"))
    code, _, err = cli("encode", state_dict_file, "-o", tmp_path / "x.cdl", "--rel-step", "nan")
    assert code == 2 and err == "cdlcodec: error: --rel-step must be a finite positive number, got nan\n"
    code, _, err = cli("encode", state_dict_file, "-o", tmp_path / "x.cdl", "--step", "1", "--rel-step", "0.2")
    assert err == "cdlcodec: error: choose one of --rel-step, --step, --bits (got --rel-step and --step)\n"


def test_encode_summary_reports_the_input_file_size(state_dict_file, tmp_path, cli):
    import os

    code, out, _ = cli("encode", state_dict_file, "-o", tmp_path / "x.cdl", "--step", "0.05")
    assert code == 0
    assert f"{state_dict_file} -> {tmp_path / 'x.cdl'}: {os.path.getsize(state_dict_file):,} -> " in out
