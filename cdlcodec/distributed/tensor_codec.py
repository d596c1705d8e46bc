"""CDL-coded tensors for any point-to-point or collective exchange (model and data parallelism).

    payload = encode_tensor(layer.weight, layer)                   # a cdlcodec.cdl CDLLinear/CDLConv2d
    payload = encode_tensor(activations, act_quantizer)            # a cdlcodec.cdl ActivationQuantizer
    payload = encode_tensor(t, step=0.01, bits=8)                  # or a plain step
    t_hat = decode_tensor(payload)                                 # on the other side

The tensor is quantized with the hard CDL quantizer (the nearest level of the uniform alphabet,
clipped: the most probable level of the CPMF, CDL paper eq. 4 / 10a-10b), the integer levels are
coded with a lossless backend from the registry (`cdlcodec.backends.get(name)`), and the result is
framed with its shape, dtype, step and level range (wire.TensorFrame, CRC32-checked).

Quantizer objects are duck-typed; these attributes are read (tensor or number, current values):
  step:  `step`, else `q` (weight quantizers), else `s` (activation quantizers)
  bits:  `bits`, else `b`   (optional: without it levels are only limited to +-(2^31 - 1))
  alphabet: `bounds` (a (lo, hi) pair or a method returning one: cdlcodec.cdl layers and
         activation quantizers have it), else `lo` and `hi` if both present; else signed {-2^(b-1) .. 2^(b-1) - 1} (eq. 10a) unless
         the object has `signed = False` or is an activation quantizer (has `s` but no `q`), which
         use {0 .. 2^b - 1} (eq. 10b).
The sharpness (alpha / beta) only shapes the soft quantizer used in training; hard quantization
and hence the coded tensor do not depend on it.

Decoding is bit-exact: a value is float32(level) * float32(step), one correctly-rounded product.
"""
from __future__ import annotations

import numpy as np
from ..optional import require
require("torch", "cdlcodec.distributed")
import torch

from ..backends import MAX_ABS_LEVEL, EncodeHint, get, get_for_decoding
from ..errors import CdlDecodeError, CdlInputError
from . import wire

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPES_BY_CODE = {v: k for k, v in _DTYPES.items()}


def _scalar(value, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise CdlInputError(f"{what} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().reshape(()).item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CdlInputError(f"{what} must be a number, got {type(value).__name__}") from None


def quantizer_params(quantizer) -> tuple[float, int | None, int | None]:
    """(step, lo, hi) read from a CDL quantizer (see module docstring); lo/hi None when unbounded."""
    step = None
    for name in ("step", "q", "s"):
        if hasattr(quantizer, name) and getattr(quantizer, name) is not None:
            step = _scalar(getattr(quantizer, name), f"quantizer.{name}")
            break
    if step is None:
        raise CdlInputError(f"{type(quantizer).__name__} exposes no step (`step`, `q` or `s`)")
    bounds = getattr(quantizer, "bounds", None)
    if callable(bounds):
        bounds = bounds()
    if bounds is not None:
        try:
            lo, hi = (int(_scalar(v, "quantizer.bounds")) for v in bounds)
        except (TypeError, ValueError):
            raise CdlInputError("quantizer.bounds must be a pair of integers (lo, hi)") from None
        return step, lo, hi
    if getattr(quantizer, "lo", None) is not None and getattr(quantizer, "hi", None) is not None:
        return step, int(_scalar(quantizer.lo, "lo")), int(_scalar(quantizer.hi, "hi"))
    bits = None
    for name in ("bits", "b"):
        if getattr(quantizer, name, None) is not None:
            bits = int(round(_scalar(getattr(quantizer, name), f"quantizer.{name}")))
            break
    if bits is None:
        return step, None, None
    signed = getattr(quantizer, "signed", None)
    if signed is None:
        signed = not (hasattr(quantizer, "s") and not hasattr(quantizer, "q"))
    lo, hi = alphabet(bits, bool(signed))
    return step, lo, hi


def alphabet(bits: int, signed: bool) -> tuple[int, int]:
    """Level range for b bits: signed eq. 10a, unsigned eq. 10b."""
    if not 1 <= bits <= 31:
        raise CdlInputError(f"bit width must be 1..31, got {bits}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def quantize_levels(values: np.ndarray, step: float, lo: int, hi: int) -> np.ndarray:
    """clip(round_half_even(float32(t) / float32(step)), lo, hi) as int64 (the hard quantizer)."""
    ratio = np.asarray(values, dtype=np.float32) / np.float32(step)
    return np.clip(np.rint(ratio), lo, hi).astype(np.int64)


def encode_tensor(t, quantizer=None, *, step: float | None = None, bits: int | None = None,
                  signed: bool = True, backend: str = "huffman") -> bytes:
    """Quantize a float tensor (torch or numpy) and code its levels; returns self-describing bytes.

    Give either a CDL quantizer object or `step` (and optionally `bits`, `signed`).
    """
    if isinstance(t, torch.Tensor):
        dtype = t.dtype
        array = t.detach().to(torch.float32).cpu().numpy()
    else:
        array = np.asarray(t)
        dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float64): torch.float64}.get(array.dtype, torch.float32)
        array = array.astype(np.float32)
    if dtype not in _DTYPES:
        raise CdlInputError(f"encode_tensor codes floating-point tensors, got {dtype}")
    if quantizer is not None:
        if step is not None:
            raise CdlInputError("give either a quantizer or a step, not both")
        step, lo, hi = quantizer_params(quantizer)
    elif step is not None:
        step = _scalar(step, "step")
        lo, hi = alphabet(int(bits), signed) if bits is not None else (None, None)
    else:
        raise CdlInputError("encode_tensor needs a quantizer or a step")
    step32 = np.float32(step)
    if not (np.isfinite(step32) and step32 > 0):
        raise CdlInputError(f"quantization step must be a positive finite number, got {step}")
    if not np.all(np.isfinite(array)):
        raise CdlInputError("cannot code a tensor holding inf or NaN")
    if lo is None:
        lo, hi = -MAX_ABS_LEVEL, MAX_ABS_LEVEL
    levels = quantize_levels(array.ravel(), float(step32), lo, hi)
    coder = get(backend)
    payload, params = coder.encode(levels, EncodeHint(shape=tuple(array.shape)))
    frame = wire.TensorFrame(
        _DTYPES[dtype], tuple(int(d) for d in array.shape), int(np.array([step32]).view(np.uint32)[0]),
        int(lo), int(hi), coder.name, bytes(params), bytes(payload),
    )
    return frame.to_bytes()


def decode_levels(payload: bytes, max_numel: int = wire.DEFAULT_MAX_NUMEL) -> tuple[np.ndarray, wire.TensorFrame]:
    """The int64 levels (shaped) and the parsed frame; CdlDecodeError for anything malformed."""
    frame = wire.TensorFrame.parse(payload, max_numel)
    coder = get_for_decoding(frame.backend)
    levels = np.asarray(coder.decode(frame.payload, frame.params, frame.numel, frame.shape), dtype=np.int64)
    if levels.size != frame.numel:
        raise CdlDecodeError(f"tensor payload decodes to {levels.size} levels, expected {frame.numel}")
    if levels.size and (levels.min() < frame.lo or levels.max() > frame.hi):
        raise CdlDecodeError(f"tensor payload holds levels outside its declared range [{frame.lo}, {frame.hi}]")
    return levels.reshape(frame.shape), frame


def decode_tensor(payload: bytes, max_numel: int = wire.DEFAULT_MAX_NUMEL) -> torch.Tensor:
    """The dequantized tensor (original shape and dtype): float32(level) * float32(step)."""
    levels, frame = decode_levels(payload, max_numel)
    step = frame.step
    if not (np.isfinite(step) and step > 0):
        raise CdlDecodeError(f"tensor payload has an invalid step {float(step)!r}")
    dtype = _DTYPES_BY_CODE.get(frame.dtype_code)
    if dtype is None:
        raise CdlDecodeError(f"tensor payload has unknown dtype code {frame.dtype_code}")
    values = levels.astype(np.float32) * step
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)


def reference_dequantize(t, quantizer=None, *, step=None, bits=None, signed=True) -> torch.Tensor:
    """What decode_tensor(encode_tensor(...)) returns, computed locally (for tests and accounting)."""
    if quantizer is not None:
        step, lo, hi = quantizer_params(quantizer)
    else:
        step = _scalar(step, "step")
        lo, hi = alphabet(int(bits), signed) if bits is not None else (-MAX_ABS_LEVEL, MAX_ABS_LEVEL)
    array = (t.detach().to(torch.float32).cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32))
    levels = quantize_levels(array, float(np.float32(step)), lo, hi)
    return torch.from_numpy(levels.astype(np.float32) * np.float32(step))
