"""--bits never silently destroys a tensor with outliers: such tensors get per-channel steps, and say so."""
from __future__ import annotations

import numpy as np

from cdlcodec.codec import decode_container
from cdlcodec.formats.container import ContainerReader


def test_bits_switches_outlier_heavy_tensors_to_per_channel_steps(tmp_path, cli):
    import torch

    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(64, 32, generator=g) * 0.05
    heavy[3, 7] = 40.0 * float(heavy.std())     # one re-parameterisation outlier
    plain = torch.randn(64, 32, generator=g) * 0.05
    torch.save({"heavy.weight": heavy, "plain.weight": plain}, tmp_path / "m.pt")
    out = tmp_path / "m.cdl"
    code, _, err = cli("encode", tmp_path / "m.pt", "-o", out, "--bits", "4")
    assert code == 0
    assert "1 outlier-heavy tensor(s) got one step per output channel" in err and "heavy.weight" in err
    with ContainerReader(str(out)) as reader:
        quants = {e.name: e.quant for e in reader.tensors}
        assert reader.metadata["quantizer.per_channel"] == "heavy.weight"
    assert "steps" in quants["heavy.weight"] and "step" in quants["plain.weight"]
    decoded = {r.name: r.array for r in decode_container(str(out)).records}
    # away from the outlier's channel, the weights survive 4 bits (one max-abs step per tensor
    # would have rounded nearly all of them to zero)
    rows = np.r_[0:3, 4:64]
    err_heavy = np.abs(decoded["heavy.weight"][rows] - heavy.numpy()[rows]).mean()
    assert err_heavy < 0.5 * np.abs(heavy.numpy()[rows]).mean()
    zeroed_per_tensor = np.rint(heavy.numpy()[rows] / (float(heavy.abs().max()) / 7)) == 0
    assert zeroed_per_tensor.mean() > 0.9


def test_bits_without_outliers_keeps_one_step_per_tensor(tmp_path, cli):
    import torch

    torch.save({"w": torch.randn(16, 8, generator=torch.Generator().manual_seed(1))}, tmp_path / "m.pt")
    code, _, err = cli("encode", tmp_path / "m.pt", "-o", tmp_path / "m.cdl", "--bits", "8")
    assert code == 0 and "outlier" not in err
    with ContainerReader(str(tmp_path / "m.cdl")) as reader:
        assert "step" in reader.tensors[0].quant and "quantizer.per_channel" not in reader.metadata
