"""`cdlcodec eval --onnx` and `cdlcodec search --onnx`: your own ONNX model, calibration data, a measure."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx_models import mlp  # noqa: E402

from cdlcodec.codec import decode_container  # noqa: E402
from cdlcodec.errors import CdlInputError  # noqa: E402
from cdlcodec.evaluation import run_sweep  # noqa: E402
from cdlcodec.evaluation.onnx_task import onnx_task  # noqa: E402
from cdlcodec.fidelity.inputs import load_calibration  # noqa: E402
from cdlcodec.fidelity.measures import cosine  # noqa: E402
from cdlcodec.fidelity.runner import run_proto  # noqa: E402
from cdlcodec.io.onnx_writer import build_onnx  # noqa: E402


@pytest.fixture
def model(tmp_path):
    path = mlp(str(tmp_path / "mlp.onnx"))
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32))
    return path, str(calibration)


def _decoded_cosine(container, model_path, calibration):
    """Decode `container`, run it and the original model on the calibration inputs, independently of the search."""
    import onnx

    original = onnx.load(model_path)
    inputs = load_calibration(calibration, original)
    return cosine(run_proto(original, inputs), run_proto(build_onnx(decode_container(container)), inputs))


def test_eval_onnx_reports_bits_and_the_measure(model, tmp_path, cli):
    path, calibration = model
    out = tmp_path / "ev"
    code, stdout, _ = cli("eval", "--onnx", path, "--calibration", calibration, "-m", "nearest", "-m", "fidelity",
                          "-m", "trellis", "--rel-step", "0.05,0.2,0.5", "--targets", "0.99,0.999", "-o", out,
                          "--no-plot")
    assert code in (0, None)
    assert "cosine" in stdout and "accuracy" not in stdout
    results = json.loads((out / "results.json").read_text())
    sweep = results["sweeps"][0]
    assert sweep["measure"] == "cosine" and "reference_accuracy" not in sweep
    rows = {r["key"]: r for r in sweep["rows"]}
    assert not [r for r in rows.values() if "error" in r]
    assert len(rows) == 8 and all("accuracy" not in r for r in rows.values())
    nearest = [rows[f"mlp.onnx/nearest/rel_step={s}"] for s in ("0.05", "0.2", "0.5")]
    bits = [r["bits_per_param"] for r in nearest]
    assert bits[0] > bits[1] > bits[2]
    scores = [r["fidelity"] for r in rows.values()]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert nearest[0]["fidelity"] > nearest[2]["fidelity"]
    # the fidelity points meet their targets when scored again on every calibration sample
    assert rows["mlp.onnx/fidelity/target=0.99"]["fidelity"] >= 0.99
    assert rows["mlp.onnx/fidelity/target=0.999"]["fidelity"] >= 0.999
    assert "fidelity" in (out / "results.csv").read_text().splitlines()[0].split(",")
    # the gate compares accuracy: a fidelity sweep is refused, not crashed on
    code, _, err = cli("eval", "--results", out / "results.json", "--no-plot", "--update-baseline", tmp_path / "b.json")
    assert code == 2 and "cannot be gated" in err and not (tmp_path / "b.json").exists()


def test_onnx_task_sweep_scores_rel_mse(model):
    task = onnx_task(*model, measure="rel_mse")
    result = run_sweep(task, [{"method": "nearest", "rel_step": [0.05, 0.5]}, {"method": "rd", "rel_step": 0.2}],
                       quiet=True)
    rows = {r["key"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if "error" in r]
    assert rows["mlp.onnx/nearest/rel_step=0.05"]["fidelity"] < rows["mlp.onnx/nearest/rel_step=0.5"]["fidelity"]
    assert rows["mlp.onnx/rd/rel_step=0.2"]["measure"] == "rel_mse"
    with pytest.raises(CdlInputError, match="does not apply"):
        run_sweep(task, [{"method": "cdl"}], quiet=True)


def test_fidelity_method_does_not_apply_to_builtin_tasks(cli):
    code, _, err = cli("eval", "lenet5-mnist", "-m", "fidelity", "--no-plot")
    assert code == 2 and "does not apply" in err


def test_search_onnx_writes_a_container_meeting_the_target(model, tmp_path, cli):
    path, calibration = model
    out = tmp_path / "best.cdl"
    code, stdout, _ = cli("search", "--onnx", path, "--calibration", calibration, "--measure", "cosine",
                          "--min", "0.99", "-o", out, "-q")
    assert code in (0, None)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["output"] == str(out) and summary["best"]["score"] >= 0.99
    assert {c["method"] for c in summary["candidates"]} == {"fidelity", "nearest"}
    assert summary["best"]["file_bytes"] == min(c["file_bytes"] for c in summary["candidates"])
    assert out.stat().st_size == summary["best"]["file_bytes"]
    assert _decoded_cosine(str(out), path, calibration) >= 0.99
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cdlcodec-search")] == []


@pytest.mark.parametrize("args, message", [
    (["--onnx", "{missing_model}", "--calibration", "{calib}"], "no such file"),
    (["--onnx", "{bad}", "--calibration", "{calib}"], "not a valid ONNX model"),
    (["--onnx", "{model}", "--calibration", "{missing}"], "calibration data"),
    (["--onnx", "{model}", "--calibration", "{wrong}"], "named after the graph inputs"),
    (["--onnx", "{model}"], "needs --calibration"),
    (["--onnx", "{model}", "--calibration", "{calib}", "--measure", "psnr"], "unknown fidelity measure"),
    (["--onnx", "{model}", "--calibration", "{calib}", "--compare"], "--compare does not apply"),
    (["--onnx", "{model}", "--calibration", "{calib}", "-m", "rcdl"], "does not apply"),
    (["--onnx", "{model}", "--calibration", "{calib}", "--targets", "1.5"], "must lie in"),
    (["lenet5-mnist", "--calibration", "{calib}"], "give --onnx"),
])
def test_eval_onnx_bad_inputs_exit_2(model, tmp_path, run_cli, args, message):
    names = _bad_files(model, tmp_path)
    done = run_cli("eval", *[a.format(**names) for a in args], "-q", "--no-plot", "-o", tmp_path / "ev")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("cdlcodec: error:") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("args, message", [
    (["--onnx", "{missing_model}", "--calibration", "{calib}", "--min", "0.99"], "no such file"),
    (["--onnx", "{model}", "--calibration", "{missing}", "--min", "0.99"], "calibration data"),
    (["--onnx", "{model}", "--calibration", "{calib}", "--measure", "psnr", "--min", "0.99"], "unknown fidelity measure"),
    (["--onnx", "{model}", "--calibration", "{calib}", "--measure", "rel_mse", "--min", "0.99"], "needs --max"),
    (["--onnx", "{model}", "--calibration", "{calib}"], "needs --min"),
    (["--onnx", "{model}", "--calibration", "{calib}", "--min", "0.99", "--tolerance", "1"], "--tolerance does not apply"),
    (["--min", "0.99"], "give --onnx"),
])
def test_search_onnx_bad_inputs_exit_2(model, tmp_path, run_cli, args, message):
    names = _bad_files(model, tmp_path)
    out = tmp_path / "out.cdl"
    done = run_cli("search", *[a.format(**names) for a in args], "-q", "-o", out)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("cdlcodec: error:") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def _bad_files(model, tmp_path) -> dict:
    path, calibration = model
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, y=np.zeros((4, 32), np.float32))
    return {"model": path, "calib": calibration, "missing": str(tmp_path / "nope.npz"),
            "missing_model": str(tmp_path / "nope.onnx"), "bad": str(bad),
            "wrong": str(wrong)}
