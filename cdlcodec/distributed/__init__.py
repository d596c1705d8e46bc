"""Compressed communication for torch.distributed: CO3 gradient hook and coded tensor exchange.

- `co3_hook`, `CO3State`, `register`: CO3 gradient compression as a DDP communication hook
  (fp4/fp8 conversion with a per-bucket exponent bias, static Huffman code, error feedback).
- `encode_tensor`, `decode_tensor`: CDL-quantized, entropy-coded tensors for any exchange.

Submodules import torch.distributed lazily enough that `import cdlcodec.distributed` stays cheap.
"""
from .hook import CO3Counters, CO3State, co3_hook, register
from .tensor_codec import decode_tensor, encode_tensor

__all__ = ["CO3State", "CO3Counters", "co3_hook", "register", "encode_tensor", "decode_tensor"]
