"""CRC-valid hostile containers (tests/fuzz/fuzz_containers.py): mutated payloads, backend params,
counts, shapes, dtypes, quantization and index fields with every checksum recomputed, decoded in a
worker process under a 2 GiB address-space limit. Only a CdlError may come out: any other exception,
a warning, a MemoryError, a dead worker or a case over its time limit fails the test.
The long campaign (100,000+ cases) is the same script from the command line: benchmarks/results/fuzz.md."""
from __future__ import annotations

import time

import pytest

from fuzz.fuzz_containers import build_seeds, campaign, make_case, split_container


def test_a_few_hundred_crc_valid_hostile_containers_give_only_cdl_errors():
    start = time.monotonic()
    result = campaign(cases=800, seed=20260, jobs=1, timeout=20.0, mem_mb=2048)
    assert result["cases"] == 800
    assert result["failures"] == [], "\n".join(f"case {f['case']}: {f['outcome']}\n{f['detail']}"
                                               for f in result["failures"])
    counts = result["counts"]
    # the mutations must reach past the container checks: some files still decode, most are refused
    assert counts["decoded"] >= 40 and counts["refused"] >= 400, counts
    assert time.monotonic() - start < 60


def test_cases_are_reproducible_and_keep_checksums_valid():
    import zlib

    from cdlcodec.formats.container import FOOTER, PREFIX

    seeds = build_seeds()
    for case in range(40):
        data = make_case(seeds, 5, case)
        assert data == make_case(seeds, 5, case)
        index_offset, index_length, crc, _, _ = FOOTER.unpack(data[-FOOTER.size:])
        assert crc == zlib.crc32(data[:PREFIX.size] + data[index_offset:index_offset + index_length]
                                 + data[-FOOTER.size:-FOOTER.size + 16])


@pytest.mark.parametrize("seed", range(3))
def test_every_seed_container_decodes(tmp_path, seed):
    """The starting points are valid files, so that a refusal is caused by a mutation."""
    from cdlcodec.codec import decode_container
    from cdlcodec.verify import verify_container

    seeds = build_seeds()
    for i, data in enumerate(seeds[seed::3]):
        path = tmp_path / f"seed{i}.cdl"
        path.write_bytes(data)
        index, tensors, sections = split_container(data)
        assert len(decode_container(str(path)).records) == len(index["tensors"])
        verify_container(str(path))
