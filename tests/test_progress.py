"""Progress where stderr is not a terminal (issue 18): CliRunner's stderr is not a tty, like a CI log."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cdlcodec import progress
from cdlcodec.cli.main import cli
from cdlcodec.jit import HAVE_NUMBA

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(autouse=True)
def _reset_mode():
    yield
    progress.set_mode(None)


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result


def _encode_args(tmp_path, *extra):
    return ("encode", GOLDEN / "container_input.safetensors", "-o", tmp_path / "m.cdl", "--backend", "huffman",
            "--rel-step", "0.1", *extra)


@pytest.mark.parametrize("mode", ["auto", "lines"])
def test_encode_prints_lines_when_not_on_a_terminal(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # a line for every tensor, not every 5 s
    result = _invoke(*_encode_args(tmp_path, "--progress", mode))
    lines = [line for line in result.stderr.splitlines() if line.startswith("encoding: ")]
    assert len(lines) >= 5 and lines[-1].startswith("encoding: done in")
    assert "\r" not in result.stderr  # lines, not a redrawn bar


def test_lines_are_throttled(tmp_path):
    result = _invoke(*_encode_args(tmp_path, "--progress", "lines"))  # well under LINE_INTERVAL
    assert "encoding:" not in result.stderr


@pytest.mark.parametrize("flags", [("--progress", "none"), ("-q",), ("-q", "--progress", "lines")])
def test_none_and_quiet_are_silent(tmp_path, monkeypatch, flags):
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)
    result = _invoke(*_encode_args(tmp_path, *flags))
    assert "encoding" not in result.stderr
    if "-q" in flags:
        assert result.stderr == "" and result.stdout == ""


def test_bar_mode_draws_a_bar_even_into_a_file(tmp_path):
    result = _invoke("decode", GOLDEN / "container_cabac.cdl", "-o", tmp_path / "x.safetensors", "--progress", "bar")
    assert "decoding" in result.stderr and "\r" in result.stderr and "[" in result.stderr


def test_an_unknown_mode_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, [*map(str, _encode_args(tmp_path)), "--progress", "sometimes"])
    assert result.exit_code == 2 and "sometimes" in result.stderr


def test_train_reports_every_epoch_with_accuracy_and_rate(tmp_path):
    out = tmp_path / "fp.pt"
    result = _invoke("train", "lenet5-mnist", "--mode", "fp", "--epochs", "2", "--train-samples", "256", "-o", out)
    epochs = [line for line in result.stderr.splitlines() if ": epoch " in line]
    assert len(epochs) == 2, result.stderr
    for n, line in enumerate(epochs, 1):
        assert f"epoch {n}/2: train accuracy " in line and " samples/s" in line
    assert result.stdout.strip().startswith("{")  # the JSON report stays alone on stdout


def test_train_with_progress_none_is_silent(tmp_path):
    result = _invoke("train", "lenet5-mnist", "--mode", "fp", "--epochs", "1", "--train-samples", "128",
                     "-o", tmp_path / "fp.pt", "--progress", "none")
    assert result.stderr == ""


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed: nothing is compiled")
def test_first_compile_is_announced_once(tmp_path):
    """A fresh numba cache (a new install): the first decode says up front that it compiles; the
    second, with the cache filled, does not; `--progress none` never does."""
    def decode(cache, *flags):
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        proc = subprocess.run([sys.executable, "-m", "cdlcodec", "decode", str(GOLDEN / "container_raw.cdl"),
                               "-o", str(tmp_path / "x.safetensors"), *flags], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    with tempfile.TemporaryDirectory() as cache:
        assert "compiling numba kernels" not in decode(cache, "--progress", "none")
    with tempfile.TemporaryDirectory() as cache:
        first = decode(cache, "--progress", "lines")
        assert first.count("compiling numba kernels for their first use") == 1
        assert "compiling" not in decode(cache, "--progress", "lines")
