"""The 5-level backward kernels' ∂/∂q, ∂/∂α sums (`_kernels._pair_sums`: eight interleaved partial sums in a
fixed order) and the forward's MPMF scatter in a loop of its own (`_hist5`)."""
import math

import numpy as np
import pytest

pytest.importorskip("numba")
from cdlcodec.cdl import _kernels  # noqa: E402


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 511, 512])
def test_pair_sums_equal_the_exact_sums_and_their_own_order(n):
    rng = np.random.default_rng(n)
    bq = rng.standard_normal(512) * 10.0 ** rng.integers(-6, 6, 512)
    ba = rng.standard_normal(512)
    sq, sa = _kernels._pair_sums(bq, ba, n)
    assert sq == pytest.approx(math.fsum(bq[:n]), rel=1e-12, abs=1e-12 * np.abs(bq[:n]).sum())
    assert sa == pytest.approx(math.fsum(ba[:n]), rel=1e-12, abs=1e-12 * np.abs(ba[:n]).sum())
    # The documented order, element j into partial sum j mod 8, combined pairwise: bit for bit.
    parts = [[0.0] * 8, [0.0] * 8]
    for j in range(n):
        r = j % 8 if j < n - n % 8 else 0
        parts[0][r] += bq[j]
        parts[1][r] += ba[j]
    ref = [((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])) for p in parts]
    assert (sq, sa) == (ref[0], ref[1])
    # Elements past n are not read.
    bq2, ba2 = bq.copy(), ba.copy()
    bq2[n:] = np.nan
    ba2[n:] = np.nan
    assert _kernels._pair_sums(bq2, ba2, n) == (sq, sa)


def test_hist5():
    rng = np.random.default_rng(3)
    m, size = 300, 16
    kb = rng.integers(0, size - 4, m)
    p = rng.random((5, m))
    hist = np.zeros((4, size))
    _kernels._hist5(hist, kb, p[0], p[1], p[2], p[3], p[4])
    ref = np.zeros((4, size))
    for j in range(m):
        for o in range(5):
            ref[j & 3, kb[j] + o] += p[o, j]
    assert np.array_equal(hist, ref)
