"""One side of the side-by-side backend speed benchmark (`bench_cabac.py --speed`), run as a child process.

    python speed_worker.py nnc LEVELS.npy     # NNCodec's C++ CABAC (deepCABAC), in NNCodec's own venv
    python speed_worker.py cdl LEVELS.npy [TREE]   # cdlcodec's cabac and huffman backends (from TREE if given)

The worker loads the levels, codes them once (checking the round trip), then answers every line it
reads on stdin with one JSON line of timings for one more encode and decode of each coder: CPU
seconds of this process (every coder here is single-threaded), so a round measures one coder alone
while the driver and the other workers wait. Only numpy is imported at the top: NNCodec's venv has
no cdlcodec, and cdlcodec's has no NNCodec.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def cpu(fn):
    t = time.process_time()
    result = fn()
    return time.process_time() - t, result


def nnc_coders(levels):
    from nncodec.extensions import deepCABAC
    from nncodec.nnc_core.hdsp.hdsp_tool import HDSP_OPTS_OFF

    lv = levels.astype(np.int32)
    n_gt = 10  # cabac_unary_length, the same number of greater-than flags as cdlcodec's default

    def encode():
        enc = deepCABAC.Encoder()
        enc.initCtxModels(n_gt, 0)
        # no dependent quantization, scan order 0, profile 0, no row skipping, no HDSP, no codebook
        enc.encodeLayer(lv, 0, 0, 0, 0, 0, np.zeros(1, np.int32), *HDSP_OPTS_OFF(), 0, 0)
        return enc.finish().tobytes()

    def decode(stream):
        out = np.zeros(lv.size, np.int32)
        dec = deepCABAC.Decoder()
        dec.setStream(bytearray(stream))
        dec.initCtxModels(n_gt)
        dec.decodeLayer(out, 0, 0, 0, 0, *HDSP_OPTS_OFF(), 0, 0)
        dec.finish()
        return out

    return {"nncodec": (encode, decode)}


def use_tree(tree):
    """Import cdlcodec from the source tree `tree`: first on the path, and the editable install's
    import hook (which would map cdlcodec to the checkout it was installed from) taken out."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", type(f).__module__).startswith("__editable__")]
    sys.path.insert(0, tree)


def cdl_coders(levels):
    import cdlcodec
    from cdlcodec.backends.cabac import CabacBackend
    from cdlcodec.backends.huffman import HuffmanBackend

    def pair(backend):
        return (lambda: backend.encode(levels),
                lambda coded: backend.decode(coded[0], coded[1], levels.size))

    print(f"cdlcodec from {os.path.dirname(cdlcodec.__file__)}", file=sys.stderr)
    return {"cabac": pair(CabacBackend(parallel=False)), "huffman": pair(HuffmanBackend())}


def coded_size(coded) -> int:
    return len(coded) if isinstance(coded, bytes) else len(coded[0]) + len(coded[1])


def main():
    kind, path = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        use_tree(sys.argv[3])
    levels = np.load(path)
    coders = nnc_coders(levels) if kind == "nnc" else cdl_coders(levels)
    sizes = {}
    for name, (encode, decode) in coders.items():
        coded = encode()
        if not np.array_equal(decode(coded), levels):
            raise SystemExit(f"{name}: round trip failed")
        sizes[name] = coded_size(coded)
    print(json.dumps({"ready": True, "sizes": sizes}), flush=True)
    for _ in sys.stdin:
        result = {}
        for name, (encode, decode) in coders.items():
            t_enc, coded = cpu(encode)
            t_dec, _ = cpu(lambda: decode(coded))
            result[name] = {"enc": t_enc, "dec": t_dec}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
