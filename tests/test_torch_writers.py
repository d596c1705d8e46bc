"""torch outputs (.pt, .pt2): the same container always decodes to the same bytes, a full disk is one
clean error with nothing left behind; torch inputs the reader cannot use are named (issue #11)."""
from __future__ import annotations

import errno
import os
import subprocess
import warnings

import pytest
import torch
from torch import nn

from cdlcodec.api import encode


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """A state_dict container and a torch.export container, each decoding to more than 64 KiB."""
    root = tmp_path_factory.mktemp("writers")
    net = nn.Sequential(nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    torch.save(net.state_dict(), root / "net.pt")
    torch.export.save(torch.export.export(net, (torch.randn(2, 200),)), root / "net.pt2")
    encode(str(root / "net.pt"), str(root / "pt.cdl"), backend="raw")
    encode(str(root / "net.pt2"), str(root / "pt2.cdl"), backend="raw")
    return {".pt": root / "pt.cdl", ".pt2": root / "pt2.cdl"}


@pytest.mark.parametrize("ext", [".pt", ".pt2"])
def test_decoding_twice_gives_identical_bytes(tmp_path, cli, run_cli, containers, ext):
    outputs = [tmp_path / f"a{ext}", tmp_path / f"b{ext}"]
    for out in outputs:  # torch used to name the archive's folder after a random temporary file
        assert cli("decode", containers[ext], "-o", out, "-q")[0] == 0
    outputs.append(tmp_path / f"c{ext}")
    assert run_cli("decode", containers[ext], "-o", outputs[-1], "-q").returncode == 0  # another process
    first = outputs[0].read_bytes()
    assert all(out.read_bytes() == first for out in outputs[1:])


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (needs permission to mount; skipped without it)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("ext", [".pt", ".pt2"])
def test_full_disk_is_one_clean_error(full_disk, run_cli, containers, ext):
    # a subprocess: torch's own file writer used to abort the whole process (SIGABRT) on .pt2
    result = run_cli("decode", containers[ext], "-o", full_disk / f"out{ext}", "-q")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("cdlcodec: error:") and result.stderr.count("\n") == 1, result.stderr
    assert "No space left on device" in result.stderr
    assert os.listdir(full_disk) == []


@pytest.mark.parametrize("ext", [".pt", ".pt2"])
def test_failed_write_is_reported_and_cleaned_up(tmp_path, cli, containers, monkeypatch, ext):
    """The same without a tmpfs: the atomic write's flush to disk fails as on a full disk."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(os, "fsync", no_space)
    code, _, err = cli("decode", containers[ext], "-o", out_dir / f"out{ext}", "-q")
    assert code == 2 and err.startswith("cdlcodec: error:") and err.count("\n") == 1, err
    assert "No space left on device" in err
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("kind, message", [
    ("sparse_coo", "tensor 'w' is sparse (sparse_coo); save it dense"),
    ("sparse_csr", "tensor 'w' is sparse (sparse_csr); save it dense"),
    ("meta", "tensor 'w' is on the meta device"),
])
def test_tensors_without_dense_values_are_named(tmp_path, cli, kind, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR support is "beta"
        tensor = {"sparse_coo": lambda: torch.randn(4, 4).to_sparse(),
                  "sparse_csr": lambda: torch.randn(4, 4).to_sparse_csr(),
                  "meta": lambda: torch.empty(4, 4, device="meta")}[kind]()
    torch.save({"w": tensor, "b": torch.zeros(4)}, tmp_path / "m.pt")
    code, _, err = cli("encode", tmp_path / "m.pt", "-o", tmp_path / "m.cdl", "-q")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m.cdl").exists()


def test_a_whole_module_is_refused_with_advice(tmp_path, cli):
    torch.save(nn.Linear(3, 2), tmp_path / "module.pt")
    code, _, err = cli("encode", tmp_path / "module.pt", "-o", tmp_path / "m.cdl", "-q")
    assert code == 2 and err.count("\n") == 1, err
    assert ("refused to load: it holds a whole module or other Python objects, not only tensors (it names "
            "torch.nn.modules.linear.Linear); save the model's state_dict() instead") in err
    assert err.rstrip().endswith("cdlcodec never unpickles code")
    assert "add_safe_globals" not in err  # never torch's advice on how to unpickle it anyway


class _Hyperparameters:
    """Stands for a training script's config object (a Lightning checkpoint's omegaconf containers):
    unpickling it for real calls _touched and sets .seen; cdlcodec must do neither."""
    seen = []

    def __init__(self, **values):
        self.values = values

    def __reduce__(self):
        return _touched, (self.values,)


def _touched(values):
    _Hyperparameters.seen.append(values)
    return _Hyperparameters()


def test_python_objects_next_to_the_weights_are_ignored_not_run(tmp_path, cli):
    """pesto-pitch's mir-1k_g7.ckpt (a Lightning checkpoint, its hparams as omegaconf objects) was
    refused ("it names omegaconf.listconfig.ListConfig"); its 22-tensor state_dict now encodes,
    and no code named in the file runs."""
    net = nn.Sequential(nn.Conv1d(1, 4, 5), nn.ReLU(), nn.Linear(8, 3))
    state = net.state_dict()
    torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": _Hyperparameters(lr=1e-3, layers=[4, 3])},
               tmp_path / "lightning.ckpt")
    _Hyperparameters.seen.clear()
    with pytest.warns(UserWarning, match=r"ignored the Python objects next to the weights \(.*_touched"):
        code, _, err = cli("encode", tmp_path / "lightning.ckpt", "-o", tmp_path / "l.cdl", "-q")
    assert code == 0, err
    assert _Hyperparameters.seen == []  # the reduce function was never called
    assert cli("decode", tmp_path / "l.cdl", "-o", tmp_path / "l.pt", "-q")[0] == 0
    decoded = torch.load(tmp_path / "l.pt", weights_only=True)
    assert sorted(decoded) == sorted(state)
    for name, tensor in state.items():
        assert torch.allclose(decoded[name], tensor, atol=0.02 * float(tensor.std()) + 1e-7), name


def test_weights_inside_a_python_object_are_still_refused(tmp_path, cli):
    """The placeholders drop an object's state: when the weights are in one (a whole module under
    "model"), the file is refused as before, never encoded without them."""
    torch.save({"epoch": 1, "model": nn.Linear(3, 2), "config": _Hyperparameters(lr=1.0)}, tmp_path / "m.pt")
    _Hyperparameters.seen.clear()
    code, _, err = cli("encode", tmp_path / "m.pt", "-o", tmp_path / "m.cdl", "-q")
    assert code == 2 and err.count("\n") == 1, err
    assert "refused to load: it holds a whole module or other Python objects" in err
    assert _Hyperparameters.seen == [] and not (tmp_path / "m.cdl").exists()


def test_warnings_about_the_input_are_one_line(tmp_path, run_cli):
    """cdlcodec's own warnings print as "cdlcodec: warning: ..." lines, like its errors; they printed
    as Python's "torch_checkpoint.py:167: UserWarning: ..." followed by the source line that raised them."""
    torch.save({"w": torch.randn(4, 4), "name": "net", "epoch": 3}, tmp_path / "m.pt")
    done = run_cli("encode", tmp_path / "m.pt", "-o", tmp_path / "m.cdl", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"cdlcodec: warning: {tmp_path / 'm.pt'}: ignored 2 non-tensor entries: name, epoch\n"


class _Shell:
    """Pickles as os.system(command): what a hostile checkpoint puts beside real weights."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def test_a_global_that_would_run_code_beside_the_weights_runs_nothing(tmp_path, cli):
    """The placeholders for globals beside the weights never resolve what the file names: a checkpoint
    whose extra entry unpickles as os.system(...) is refused and the command never runs."""
    marker = tmp_path / "ran"
    torch.save({"state_dict": nn.Linear(4, 2).state_dict(), "hook": _Shell(f"touch {marker}")},
               tmp_path / "hostile.ckpt")
    code, _, err = cli("encode", tmp_path / "hostile.ckpt", "-o", tmp_path / "h.cdl", "-q")
    assert not marker.exists()
    assert code == 2 and "refused to load" in err and "cdlcodec never unpickles code" in err, err
    assert not (tmp_path / "h.cdl").exists()
