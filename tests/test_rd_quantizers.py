"""RD, per-channel and trellis quantizers: exact behaviour, round trips through the container."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cdlcodec import backends
from cdlcodec.codec import EncodeOptions, decode_container, encode_records
from cdlcodec.errors import CdlFormatError, CdlInputError
from cdlcodec.quantizers import dequantize
from cdlcodec.quantizers.channel import ChannelQuantizer
from cdlcodec.quantizers.rd import RDQuantizer
from cdlcodec.quantizers.trellis import TrellisQuantizer, dequantize_dependent
from cdlcodec.quantizers.uniform import UniformQuantizer
from cdlcodec.records import TensorRecord


def _laplace(shape, seed=0):
    return np.random.default_rng(seed).laplace(size=shape).astype(np.float32)


@pytest.mark.parametrize("rate", ["cabac", "huffman"])
def test_lambda_zero_is_nearest_rounding(rate):
    w = _laplace((64, 80))
    ref, q_ref = UniformQuantizer(rel_step=0.3).quantize(w.astype(np.float64), w)
    got, q = RDQuantizer(lam=0.0, rel_step=0.3, rate=rate).quantize_tensor(w.astype(np.float64), w, rate, None)
    assert np.array_equal(got, ref) and q == q_ref


@pytest.mark.parametrize("rate", ["cabac", "huffman"])
def test_rd_trades_distortion_for_rate(rate):
    w = _laplace((128, 128), seed=1)
    v64 = w.astype(np.float64)
    backend = backends.get(rate)
    points = []
    for lam in (0.0, 0.1, 0.3):
        levels, q = RDQuantizer(lam=lam, rel_step=0.4, rate=rate).quantize_tensor(v64, w, rate, None)
        mse = float(np.mean((levels * q["step"] - v64.ravel()) ** 2))
        points.append((backend.estimate_bits(levels), mse))
    bits, mses = zip(*points)
    assert bits[0] > bits[1] > bits[2]          # rate falls as λ grows ...
    assert mses[0] < mses[1] < mses[2]          # ... and distortion rises
    # every RD level is one of the two integers around w/Δ, or 0
    levels, q = RDQuantizer(lam=0.3, rel_step=0.4, rate=rate).quantize_tensor(v64, w, rate, None)
    r = v64.ravel() / q["step"]
    assert np.all((levels == np.floor(r)) | (levels == np.ceil(r)) | (levels == 0))


def test_rd_respects_bits_limit_and_fisher_weights():
    w = _laplace((32, 32), seed=2)
    v64 = w.astype(np.float64)
    levels, _ = RDQuantizer(lam=0.2, bits=3, rel_step=None).quantize_tensor(v64, w, "cabac", None)
    assert levels.min() >= -3 and levels.max() <= 3
    # F_i (normalised to mean 1): the sensitive half moves off nearest rounding far less often
    fisher = np.ones(w.size)
    fisher[: w.size // 2] = 1e4
    lv, q = RDQuantizer(lam=0.3, rel_step=0.4).quantize_tensor(v64, w, "huffman", fisher)
    plain, _ = RDQuantizer(lam=0.3, rel_step=0.4).quantize_tensor(v64, w, "huffman", None)
    near = np.rint(v64.ravel() / q["step"])
    half = w.size // 2
    changed_hi = np.mean(lv[:half] != near[:half])
    changed_lo = np.mean(lv[half:] != near[half:])
    changed_plain = np.mean(plain != near)
    assert changed_hi < 0.2 * changed_lo and changed_lo > 2 * changed_plain


def test_channel_steps_round_trip(tmp_path):
    w = _laplace((6, 10), seed=3) * np.arange(1, 7, dtype=np.float32)[:, None]
    levels, quant = ChannelQuantizer(rel_step=0.1).quantize(w.astype(np.float64), w)
    assert quant["axis"] == 0 and len(quant["steps"]) == 6
    for c in range(6):
        step = UniformQuantizer(rel_step=0.1).step_for(w[c])
        assert quant["steps"][c] == step
        assert np.array_equal(levels.reshape(6, 10)[c], np.rint(w[c].astype(np.float64) / step))
    # RD with λ=0 per channel is the same; through the container the values are level x step_c
    rd_levels, rd_quant = RDQuantizer(lam=0, rel_step=0.1, granularity="channel").quantize(w.astype(np.float64), w)
    assert np.array_equal(rd_levels, levels) and rd_quant == quant
    rec = TensorRecord("w", w, "float32")
    path = tmp_path / "c.cdl"
    encode_records([rec], str(path), EncodeOptions(RDQuantizer(lam=0.3, rel_step=0.1, granularity="channel"), quiet=True))
    out = decode_container(str(path)).records[0]
    steps = np.array(out.quant["steps"])[:, None]
    assert np.array_equal(out.array, (out.levels.reshape(6, 10) * steps).astype(np.float32))


def test_dependent_dequantization_rule():
    # 4 states (VVC): Q0 = even multiples, Q1 = zero and odd multiples, state by parity
    levels = np.array([1, 1, 2, -1, 0, 3, -2], dtype=np.int64)
    m = dequantize_dependent(levels, 4)
    # state: 0 -1-> 2 -1-> 3 -2-> 3 -(-1)-> 1 -0-> 2 -3-> 3 -> ...
    assert m.tolist() == [2, 1, 3, -1, 0, 5, -3]
    with pytest.raises(CdlFormatError):
        dequantize(levels, {"scheme": "dependent", "step": 0.5, "states": 5}, (7,), "float32")
    values = dequantize(levels, {"scheme": "dependent", "step": 0.5, "states": 4}, (7,), "float32")
    assert values.tolist() == [1.0, 0.5, 1.5, -0.5, 0.0, 2.5, -1.5]


@pytest.mark.parametrize("states", [4, 8])
def test_trellis_beats_uniform_at_equal_rate(tmp_path, states):
    w = _laplace((128, 256), seed=4)
    v64 = w.astype(np.float64)
    cabac = backends.get("cabac")
    tl, tq = TrellisQuantizer(lam=0.0, rel_step=0.3, states=states).quantize(v64, w)
    t_vals = dequantize(tl, tq, w.shape, "float64")
    t_bits, t_mse = cabac.estimate_bits(tl), float(np.mean((t_vals - v64) ** 2))
    # uniform quantization at the same rate has a larger error
    curve = []
    for rel in (0.3, 0.4, 0.5, 0.6, 0.7):
        ul, uq = UniformQuantizer(rel_step=rel).quantize(v64, w)
        curve.append((cabac.estimate_bits(ul), float(np.mean((ul.reshape(w.shape) * uq["step"] - v64) ** 2))))
    curve.sort()
    u_mse = np.interp(t_bits, [c[0] for c in curve], [c[1] for c in curve])
    assert curve[0][0] < t_bits < curve[-1][0]
    assert t_mse < 0.9 * u_mse
    # and the container round trip reproduces exactly those values
    path = tmp_path / "t.cdl"
    encode_records([TensorRecord("w", w, "float32")], str(path),
                   EncodeOptions(TrellisQuantizer(lam=0.1, rel_step=0.3, states=states), quiet=True))
    out = decode_container(str(path)).records[0]
    assert out.quant["scheme"] == "dependent" and out.quant["states"] == states
    m = dequantize_dependent(out.levels, states)
    assert np.array_equal(out.array, (m.reshape(w.shape) * out.quant["step"]).astype(np.float32))


def test_trellis_without_a_rate_term_matches_the_rated_search_at_lambda_zero():
    # λ = 0 runs a kernel without the rate model (so a first --trellis encode does not compile it);
    # its levels must be those of the rated search with λ = 0, blocks and chunks included
    from cdlcodec.quantizers.params import state_machine
    from cdlcodec.quantizers.channel import MAX_LEVEL
    from cdlcodec.quantizers.trellis import BLOCK, viterbi_scan

    w = _laplace((300, 500), seed=6)   # 150,000 weights: several blocks and three chunks of 2**16
    levels, quant = TrellisQuantizer(lam=0.0, rel_step=0.3, states=8).quantize(w.astype(np.float64), w)
    next_state, qid = state_machine(8)
    rated = np.zeros(w.size, np.int64)
    viterbi_scan((w.astype(np.float64) / quant["step"]).ravel(), np.ones(w.size), 0.0, np.int64(MAX_LEVEL), next_state,
                 qid, 1 << 16, 10, 0, 4, 7, BLOCK, rated)
    assert np.array_equal(levels, rated)
    assert np.count_nonzero(levels) > w.size // 4


def test_rd_encode_decode_and_cli_errors(tmp_path, run_cli):
    import torch


    w = _laplace((40, 30), seed=5)
    src = tmp_path / "m.pt"
    torch.save({"fc.weight": torch.from_numpy(w), "fc.bias": torch.zeros(40)}, src)
    out = tmp_path / "m.cdl"
    res = run_cli("encode", src, "-o", out, "--lambda", "0.2", "--granularity", "channel", "--backend", "huffman")
    assert res.returncode == 0, res.stderr
    info = json.loads(run_cli("info", out, "--json").stdout)
    assert "rd lambda=0.2" in info["metadata"]["quantizer"]
    bad = run_cli("encode", src, "-o", tmp_path / "b.cdl", "--lambda", "nan")
    assert bad.returncode != 0 and "lambda" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("encode", src, "-o", tmp_path / "b.cdl", "--seed", "3")
    assert bad.returncode != 0 and "--seed" in bad.stderr
    with pytest.raises(CdlInputError):
        RDQuantizer(lam=0.1, granularity="row")
