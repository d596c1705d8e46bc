"""Install profiles (issue 18): the core install decodes; every command that needs an extra says
which one, in one line, instead of an ImportError traceback."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from onnx_models import mlp

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_install_is_numpy_onnx_click():
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in _project()["dependencies"]}
    assert names == {"numpy", "onnx", "click"}


def test_extras_bring_what_their_names_promise():
    extras = _project()["optional-dependencies"]
    assert extras["fast"] == ["numba>=0.59"]
    assert extras["torch"] == ["torch>=2.6"]
    assert set(extras) >= {"fast", "torch", "train", "demo", "onnx", "plot", "all", "test"}
    assert extras["all"] == ["cdlcodec[fast,torch,demo,train,onnx,plot]"]
    assert extras["test"][0] == "cdlcodec[all]"  # the quick start's `.[test]` installs everything


def test_ci_installs_exactly_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[test]"' in readme
    assert 'pip install -q torch==2.13.0\npip install -q -e ".[test]"' in ci


def _cli_without(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a child where `import <module>` fails, as on a core install."""
    code = (f"import sys\nsys.modules[{module!r}] = None\n"
            "from cdlcodec.cli.main import main\n"
            f"main({list(args)!r})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args", [
    ("train", "lenet5-mnist", "-o", "t.pt", "--epochs", "1"),
    ("demo", "--quiet"),
    ("eval", "--config", str(ROOT / "benchmarks" / "ci_sweep.json"), "-o", "ev", "-q", "--no-plot"),
    ("decode", str(ROOT / "tests" / "golden" / "container_raw.cdl"), "-o", "x.pt"),
])
def test_commands_that_need_torch_say_so_in_one_line(tmp_path, args):
    proc = _cli_without("torch", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdlcodec: error: ")
    assert 'needs torch, which is not installed here: pip install "cdlcodec[torch]"' in lines[0]
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cdl_training_without_numba_runs_on_the_torch_kernels_and_says_so(tmp_path):
    # numba is optional since the quantizers have torch kernels (issue 17): training works, slower on a CPU.
    proc = _cli_without("numba", "train", "lenet5-mnist", "-o", "t.pt", "--epochs", "1", "--train-samples", "64",
                        cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "cdlcodec: note: numba is not installed: the CDL quantizers run with the torch kernels" in proc.stderr
    assert (tmp_path / "t.pt").is_file()


def test_library_modules_raise_a_clear_import_error_without_torch():
    code = ("import sys\nsys.modules['torch'] = None\n"
            "from cdlcodec.errors import CdlInputError\n"
            "for name in ('cdlcodec.models.lenet', 'cdlcodec.cdl.layers', 'cdlcodec.training', "
            "'cdlcodec.distributed.hook'):\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ImportError as exc:\n"
            "        assert isinstance(exc, CdlInputError), (name, exc)\n"
            "        assert 'pip install \"cdlcodec[torch]\"' in str(exc), (name, exc)\n"
            "    else:\n"
            "        raise SystemExit(name + ' imported without torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_load_without_torch_names_the_extra():
    code = ("import sys\nsys.modules['torch'] = None\nimport cdlcodec\n"
            "try:\n"
            f"    cdlcodec.load({str(ROOT / 'tests' / 'golden' / 'container_raw.cdl')!r})\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'cdlcodec.load (torch modules and tensors) needs torch' in proc.stdout
    assert 'pip install "cdlcodec[torch]"' in proc.stdout


def test_an_unrelated_import_error_is_still_an_internal_error():
    from cdlcodec.optional import as_missing_dependency

    assert as_missing_dependency(ModuleNotFoundError("x", name="no_such_helper"), "cdlcodec x") is None
    missing = as_missing_dependency(ModuleNotFoundError("x", name="onnxruntime.capi"), "'cdlcodec encode'")
    assert str(missing) == ("'cdlcodec encode' needs onnxruntime, which is not installed here: "
                            'pip install "cdlcodec[onnx]"')


def test_onnx_encode_without_onnxruntime_says_why_it_is_unverified(tmp_path):
    mlp(str(tmp_path / "m.onnx"))
    proc = _cli_without("onnxruntime", "encode", "m.onnx", "-o", "m.cdl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ('cdlcodec: note: onnxruntime is not installed here: the data-free default was used' in proc.stderr
            and 'pip install "cdlcodec[onnx]" for a verified fidelity' in proc.stderr)
    assert "a state_dict or .pt2 file" not in proc.stderr
