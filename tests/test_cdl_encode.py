"""CDL / R-CDL checkpoints through encode -> decode: same hard levels, same activation quantization,
outputs identical to the checkpoint's eval-mode outputs; plus the Fisher estimate and the search."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cdlcodec.api import encode  # noqa: E402
from cdlcodec.codec import decode_container  # noqa: E402
from cdlcodec.io.cdl_checkpoint import ACTIVATIONS_SECTION  # noqa: E402
from cdlcodec.quantizers.cpmf import REPORT_KEY, CpmfQuantizer  # noqa: E402


@pytest.fixture(scope="module")
def cdl_checkpoint(tmp_path_factory):
    from cdlcodec.cdl.checkpoint import cdl_state_dict
    from cdlcodec.cdl.train import TrainConfig, train_model
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.models import build

    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    torch.manual_seed(0)
    model = build("lenet5")
    config = TrainConfig(mode="cdl", bits=4, epochs=1, batch_size=64, quiet=True, lam=0.01)
    result = train_model(model, x_train[:192], y_train[:192], x_test[:64], y_test[:64], config)
    state = cdl_state_dict(result.model, architecture="lenet5", bits=4, first_last_bits=8)
    path = tmp_path_factory.mktemp("cdl") / "ckpt.pt"
    torch.save(state, path)
    return path, state, torch.as_tensor(x_test[:100])


def _reference_outputs(state, x):
    from cdlcodec.cdl.checkpoint import build_model_from_checkpoint

    with torch.no_grad():
        return build_model_from_checkpoint(state)(x)


def test_cdl_encode_decode_reproduces_eval_outputs(cdl_checkpoint, tmp_path):
    import cdlcodec
    from cdlcodec.cdl_format import hard_levels, read_cdl_metadata

    path, state, x = cdl_checkpoint
    out = tmp_path / "m.cdl"
    summary = encode(path, out)
    decoded = decode_container(str(out))
    meta = read_cdl_metadata(state)
    by_name = {r.name: r for r in decoded.records}
    for w in meta.weights:
        rec = by_name[w.weight]
        expect = hard_levels(state[w.weight].numpy(), w.q, w.bits).ravel()
        assert np.array_equal(rec.levels, expect)
        assert rec.quant["bits"] == w.bits and rec.quant["step"] == w.q
    model = cdlcodec.load(str(out))
    with torch.no_grad():
        assert torch.equal(model(x), _reference_outputs(state, x))
    # activation quantizers travel as the json section, with the checkpoint's values
    section = {name: data for name, kind, data in decoded.sections}[ACTIVATIONS_SECTION]
    items = json.loads(section)["activations"]
    assert [(a["module"], a["s"], a["bits"]) for a in items] == \
        [(a.module, a.s, a.bits) for a in meta.activations]
    # the rate report: per layer and in total, coded bits next to H(w_l)
    report = summary.report
    assert [row["module"] for row in report["layers"]] == [w.module for w in meta.weights]
    assert report["total"]["coded_bits"] == sum(row["coded_bits"] for row in report["layers"])
    assert all(row["entropy_bits"] > 0 for row in report["layers"])
    assert json.loads(decoded.metadata[REPORT_KEY])["total"]["coded_bits"] == report["total"]["coded_bits"]


def test_cdl_sample_mode_is_reproducible_and_in_alphabet(cdl_checkpoint, tmp_path):
    import cdlcodec
    from cdlcodec.cdl.checkpoint import build_model_from_checkpoint
    from cdlcodec.cdl_format import read_cdl_metadata

    path, state, x = cdl_checkpoint
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / f"{name}.cdl"
        encode(path, out, quantizer=CpmfQuantizer("sample", seed), backend="huffman")
        outs.append(decode_container(str(out)))
    meta = read_cdl_metadata(state)
    first = {r.name: r for r in outs[0].records}
    second = {r.name: r for r in outs[1].records}
    third = {r.name: r for r in outs[2].records}
    differs = False
    for w in meta.weights:
        lo, hi = w.level_range
        assert np.array_equal(first[w.weight].levels, second[w.weight].levels)
        assert first[w.weight].levels.min() >= lo and first[w.weight].levels.max() <= hi
        differs |= not np.array_equal(first[w.weight].levels, third[w.weight].levels)
    assert differs
    # the decoded model evaluates the sampled levels exactly
    model = cdlcodec.load(str(tmp_path / "a.cdl"))
    sampled_state = dict(state)
    for w in meta.weights:
        sampled_state[w.weight] = torch.from_numpy(first[w.weight].array.copy())
    with torch.no_grad():
        assert torch.equal(model(x), build_model_from_checkpoint(sampled_state)(x))


def test_cli_reports_cdl_rates(cdl_checkpoint, tmp_path, run_cli):

    path, _, _ = cdl_checkpoint
    res = run_cli("encode", path, "-o", tmp_path / "c.cdl", "--cpmf", "argmax")
    assert res.returncode == 0, res.stderr
    assert "H(w_l)" in res.stdout and "total" in res.stdout and "fc1" in res.stdout


def test_fisher_and_search_pick_fewest_bits_within_tolerance(tmp_path):
    from cdlcodec.quantizers.fisher import diagonal_fisher
    from cdlcodec.records import TensorRecord
    from cdlcodec.search import search

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    fisher = diagonal_fisher(model, [(x[:32], y[:32]), (x[32:], y[32:])])
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all(f.shape == p.shape and np.all(f >= 0) for (n, p), f in zip(model.named_parameters(), fisher.values()))
    assert fisher["0.weight"].sum() > 0

    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    records = [TensorRecord("w", w, "float32")]

    def score(recs):  # a fidelity score that falls as the step grows: -relative MSE
        return -float(np.mean((recs[0].array - w) ** 2) / np.mean(w ** 2))

    result = search(records, score, method="rd", tolerance=0.01, iterations=4, step_factors=(1.0,))
    best = result.best
    assert best is not None and best.score >= result.baseline - 0.01
    assert all(not t.ok or t.bits_per_param >= best.bits_per_param for t in result.trials)
    assert any(not t.ok for t in result.trials)  # the search did probe past the tolerance


def test_arch_on_a_cdl_checkpoint_is_refused_by_the_api_and_the_cli(cdl_checkpoint, tmp_path, cli):
    """The API and the CLI share one --arch path: both say why a CDL checkpoint takes no arch."""
    from cdlcodec.errors import CdlInputError

    path, state, _ = cdl_checkpoint
    for source in (path, state):  # a file (read with "cdl.mode") and a state_dict in memory (recognised by its tensors)
        with pytest.raises(CdlInputError, match="^this is a CDL checkpoint: .* stored without arch$"):
            encode(source, tmp_path / "a.cdl", arch="lenet5")
    code, _, err = cli("encode", path, "-o", tmp_path / "b.cdl", "--arch", "lenet5", "-q")
    assert code == 2 and err == ("cdlcodec: error: this is a CDL checkpoint: it names its own architecture and its "
                                 "ONNX graph is stored without --arch\n")
    assert not (tmp_path / "a.cdl").exists() and not (tmp_path / "b.cdl").exists()
