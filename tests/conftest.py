"""Shared fixtures: small models written the way users write them."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

# Tests run single-threaded torch: CI has 2 cores and several tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
_TORCH_THREADS = int(os.environ["OMP_NUM_THREADS"].split(",")[0])  # "4,2" sets nested levels


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test, and every fixture it sets up, starts with torch at its configured thread count.

    numba's OpenMP threading layer shares the OpenMP runtime with torch, and each parallel numba
    kernel (CDL quantizers, two-thread cabac decode) sets that runtime's thread count to numba's,
    torch's included. Float results would then depend on which tests ran before: LeNet-5 on two
    threads lands some activations on the other side of a rounding boundary. A hook, not a fixture,
    so that it runs before module-scoped fixtures (which train models) too.
    """
    torch = sys.modules.get("torch")  # tests that never import torch do not pay for it here
    if torch is not None:
        torch.set_num_threads(_TORCH_THREADS)


@pytest.fixture
def small_state_dict():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.2,
        "conv.bias": torch.randn(8, generator=g),
        "fc.weight": (torch.randn(10, 72, generator=g) * 0.05).half(),
        "fc.bias": torch.zeros(10).half(),
        "emb.weight": torch.randn(16, 4, generator=g).bfloat16(),
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(123),
        "mask": torch.tensor([True, False, True]),
        "idx": torch.arange(-5, 5, dtype=torch.int32),
        "big": torch.tensor([2**40, -(2**40)], dtype=torch.int64),
        "scalar": torch.tensor(3.5),
    }


@pytest.fixture
def state_dict_file(tmp_path, small_state_dict):
    import torch

    path = tmp_path / "model.pt"
    torch.save(small_state_dict, path)
    return path


def _run_cdlcodec(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdlcodec", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit status, stdout, stderr): the `cdlcodec` entry point run in this process."""
    from cdlcodec.cli.main import main

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


@pytest.fixture
def run_cli():
    """run_cli(*args, cwd=None, env=None): the real `cdlcodec` entry point in a subprocess -> CompletedProcess (text)."""
    return _run_cdlcodec
