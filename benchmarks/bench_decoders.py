"""Decoders benchmark (issue 6): real ONNX models through encode -> decode, sizes, time, peak memory.

    python benchmarks/bench_decoders.py [--models /tmp/models] [--work DIR]

1. silero-vad ONNX files (from the PyPI package silero-vad, in MODELS/silero): encode with a
   near-lossless step, decode --weights float, run original and decoded in onnxruntime on 2 s of
   synthetic voiced speech (harmonic glottal source with a syllable-rate envelope, plus noise), and
   report the largest difference of the speech probability and whether the 0.5 decisions agree.
2. The largest model: all-MiniLM-L6-v2 (MODELS/minilm/model.safetensors, 22.7 M parameters) in a
   small BERT encoder written here, exported to ONNX, then encode (default step, and --bits 4),
   decode to fp32 ONNX, QDQ int8 ONNX and QDQ int4 ONNX. Decode time and peak memory (max RSS of a
   fresh decoding process, `cdlcodec decode`) and file sizes, next to a torch-free baseline: the
   time and peak memory of merely loading the fp32 ONNX file with onnx.load.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)                  # slowly gliding pitch
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 15))     # harmonic source
    syllables = (np.sin(2 * np.pi * 2 * t) > -0.2) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * voiced * syllables + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def silero_probs(path: str, audio: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    window = 576  # 512 new samples + 64 of context (silero-vad v5 at 16 kHz)
    if "h" in names:  # the older sequence model: (frames, 576) at once
        frames = audio[: window * 40].reshape(40, window)
        zeros = np.zeros((1, 1, 128), np.float32)
        return sess.run(None, {"input": frames, "h": zeros, "c": zeros})[0].ravel()
    state, probs = np.zeros((2, 1, 128), np.float32), []
    for start in range(0, audio.size - window, 512):
        feeds = {"input": audio[None, start:start + window], "state": state}
        if "sr" in names:
            feeds["sr"] = np.array(16000, np.int64)
        out, state = sess.run(None, feeds)[:2]
        probs.append(out.ravel())
    return np.concatenate(probs)


def bench_silero(models: str, work: str) -> None:
    from cdlcodec.api import decode, encode
    from cdlcodec.quantizers.uniform import UniformQuantizer

    audio = speech_like(2.0)
    print("## silero-vad: encode --rel-step R -> decode --weights float, onnxruntime on 2 s of speech-like audio")
    print(f"{'model':32s} {'R':>7s} {'onnx bytes':>11s} {'cdl bytes':>10s} {'ratio':>6s} {'max|dp|':>9s} {'decisions':>9s}")
    for path in sorted(glob.glob(os.path.join(models, "silero", "*.onnx"))):
        ref = silero_probs(path, audio)
        for rel in (1e-3, 1e-4):
            cdl, out = os.path.join(work, "s.cdl"), os.path.join(work, "s.onnx")
            summary = encode(path, cdl, quantizer=UniformQuantizer(rel_step=rel))
            decode(cdl, out)
            got = silero_probs(out, audio)
            same = int(np.sum((got > 0.5) == (ref > 0.5)))
            print(f"{os.path.basename(path):32s} {rel:7.0e} {os.path.getsize(path):11,d} {summary.coded_bytes:10,d} "
                  f"{os.path.getsize(path) / summary.coded_bytes:6.2f} {np.abs(got - ref).max():9.2e} {same:4d}/{ref.size:<4d}")


# -------------------------------------------------------------------------------- MiniLM as ONNX

def build_minilm(weights: str):
    """A BERT encoder whose state_dict keys are exactly all-MiniLM-L6-v2's, loaded strictly."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.self = nn.Module()
            self.self.query, self.self.key, self.self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.output = nn.Module()
            self.output.dense, self.output.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d, eps=1e-12)
            self.heads = heads

        def forward(self, x):
            n, t, d = x.shape
            split = lambda y: y.view(n, t, self.heads, d // self.heads).transpose(1, 2)
            q, k, v = split(self.self.query(x)), split(self.self.key(x)), split(self.self.value(x))
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
            return self.output.LayerNorm(x + self.output.dense(a.transpose(1, 2).reshape(n, t, d)))

    class Layer(nn.Module):
        def __init__(self, d, ff, heads):
            super().__init__()
            self.attention = Attention(d, heads)
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(d, ff)
            self.output = nn.Module()
            self.output.dense, self.output.LayerNorm = nn.Linear(ff, d), nn.LayerNorm(d, eps=1e-12)

        def forward(self, x):
            x = self.attention(x)
            h = nn.functional.gelu(self.intermediate.dense(x))
            return self.output.LayerNorm(x + self.output.dense(h))

    class MiniLM(nn.Module):
        def __init__(self, vocab=30522, d=384, ff=1536, layers=6, heads=12, positions=512):
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(vocab, d)
            self.embeddings.position_embeddings = nn.Embedding(positions, d)
            self.embeddings.token_type_embeddings = nn.Embedding(2, d)
            self.embeddings.LayerNorm = nn.LayerNorm(d, eps=1e-12)
            self.embeddings.register_buffer("position_ids", torch.arange(positions)[None])
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer(d, ff, heads) for _ in range(layers))

        def forward(self, input_ids):
            e = self.embeddings
            t = input_ids.shape[1]
            x = e.word_embeddings(input_ids) + e.position_embeddings(e.position_ids[:, :t]) \
                + e.token_type_embeddings.weight[0]
            x = e.LayerNorm(x)
            for layer in self.encoder.layer:
                x = layer(x)
            return x.mean(dim=1)  # mean pooling, as sentence-transformers does without a mask

    model = MiniLM()
    state = load_file(weights)
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_minilm(weights: str, out: str) -> None:
    import warnings

    import torch

    model = build_minilm(weights)
    ids = torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids,), out, dynamo=False, opset_version=17, input_names=["input_ids"],
                          output_names=["embedding"], dynamic_axes={"input_ids": {0: "n", 1: "t"}})


# VmHWM (peak resident set of this process image): unlike ru_maxrss it is not carried over exec().
PEAK = ("import sys\n"
        "code = sys.argv[1]\n"
        "sys.argv = sys.argv[1:]\n"
        "exec(code)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print('PEAK_KIB', hwm, file=sys.stderr)\n")
CLI = "from cdlcodec.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"


def peak_run(code: str, *args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a fresh Python process running `code` with argv `args`."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    kib = int(next(l for l in proc.stderr.splitlines() if l.startswith("PEAK_KIB")).split()[1])
    return seconds, kib / 1024


def bench_minilm(models: str, work: str) -> None:
    import onnxruntime as ort

    weights = os.path.join(models, "minilm", "model.safetensors")
    fp32 = os.path.join(work, "minilm.onnx")
    export_minilm(weights, fp32)
    py = sys.executable
    cli = [py, "-m", "cdlcodec"]
    subprocess.run([*cli, "encode", fp32, "-o", os.path.join(work, "m.cdl"), "-q"], check=True)
    subprocess.run([*cli, "encode", fp32, "-o", os.path.join(work, "m8.cdl"), "--bits", "8", "-q"], check=True)
    subprocess.run([*cli, "encode", fp32, "-o", os.path.join(work, "m4.cdl"), "--bits", "4", "-q"], check=True)
    rows = []
    base = peak_run("import onnx\nonnx.load(sys.argv[1])", fp32)
    rows.append(("baseline: onnx.load of the fp32 .onnx", fp32, *base))
    for i, (name, cdl, args) in enumerate((
            ("rel-step 0.05 -> fp32 .onnx", "m.cdl", []),
            ("rel-step 0.05 -> QDQ .onnx (int16 levels)", "m.cdl", ["--weights", "qdq"]),
            ("--bits 8 -> fp32 .onnx", "m8.cdl", []),
            ("--bits 8 -> QDQ int8 .onnx", "m8.cdl", ["--weights", "qdq"]),
            ("--bits 4 -> fp32 .onnx", "m4.cdl", []),
            ("--bits 4 -> QDQ int4 .onnx", "m4.cdl", ["--weights", "qdq"]))):
        out = os.path.join(work, f"decoded_{i}.onnx")
        secs, peak = peak_run(CLI, "decode", os.path.join(work, cdl), "-o", out, "-q", *args)
        rows.append((name, out, secs, peak))
    print("\n## all-MiniLM-L6-v2 as ONNX (22.7 M params): sizes, decode wall time and peak RSS (fresh process)")
    print(f"{'file':44s} {'bytes':>12s} {'wall s':>7s} {'peak MiB':>9s}")
    for label, path in (("original fp32 .onnx", fp32), (".cdl (default rel-step 0.05)", os.path.join(work, "m.cdl")),
                        (".cdl (--bits 8)", os.path.join(work, "m8.cdl")), (".cdl (--bits 4)", os.path.join(work, "m4.cdl"))):
        print(f"{label:44s} {os.path.getsize(path):12,d}")
    for label, path, secs, peak in rows:
        print(f"{label:44s} {os.path.getsize(path):12,d} {secs:7.2f} {peak:9.0f}")
    # accuracy of the decoded models against the original, on random token ids
    ids = np.random.default_rng(0).integers(0, 30522, size=(8, 32)).astype(np.int64)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    run = lambda p: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    ref = run(fp32)
    print("\ncosine similarity of sentence embeddings to the original (8 random 32-token inputs), min over inputs:")
    for label, path, _, _ in rows[1:]:
        got = run(path)
        cos = np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"  {label:44s} {cos.min():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        bench_silero(args.models, work)
        bench_minilm(args.models, work)


if __name__ == "__main__":
    main()
