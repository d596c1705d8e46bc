"""A BERT encoder with transformers' BertModel module layout (embeddings, encoder.layer.N, pooler), so
that a BertModel's state_dict loads with strict=True; no transformers import, no downloads.

Input: token ids [batch, sequence] (int64), every position attended, token type 0; output: the last
hidden states [batch, sequence, hidden] and, when the checkpoint has a pooler, the pooled first token.
Sizes come from the checkpoint's shapes; the head count cannot (hidden / 64 unless given, e.g.
`--arch bert:heads=12` for all-MiniLM-L6-v2's 384 = 12 x 32).
"""
from __future__ import annotations

import math

from ..optional import require
require("torch", "the built-in models")
import torch
from torch import nn


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # positions computed, not a buffer: a buffer would be a graph constant outside the state_dict
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(torch.zeros_like(input_ids)))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.heads, self.head_size = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dropout = nn.Dropout(0.1)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_size), dim=-1)
        context = (self.dropout(weights) @ v).transpose(1, 2)
        return context.reshape(x.shape)


class _DenseAddNorm(nn.Module):
    """BertSelfOutput / BertOutput: dense, dropout, residual add, LayerNorm."""

    def __init__(self, inp: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inp, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads)
        self.output = _DenseAddNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.attention = BertAttention(hidden, heads, eps)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = _DenseAddNorm(intermediate, hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, heads, intermediate, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertPooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class Bert(nn.Module):
    """BertModel's layout; defaults are bert-base-uncased's sizes."""
    onnx_dynamic_axes = {"input": {0: "batch", 1: "sequence"}, "output_0": {0: "batch", 1: "sequence"},
                    "output_1": {0: "batch"}, "output": {0: "batch", 1: "sequence"}}

    def __init__(self, vocab_size: int = 30522, hidden: int = 768, layers: int = 12, heads: int | None = None,
                 intermediate: int = 3072, max_positions: int = 512, type_vocab_size: int = 2, pooler: bool = True,
                 eps: float = 1e-12):
        super().__init__()
        heads = heads or max(1, hidden // 64)
        self.embeddings = BertEmbeddings(vocab_size, hidden, max_positions, type_vocab_size, eps)
        self.encoder = BertEncoder(layers, hidden, heads, intermediate, eps)
        self.pooler = BertPooler(hidden) if pooler else None

    def example_inputs(self) -> tuple:
        return (torch.zeros(1, 8, dtype=torch.int64),)

    def forward(self, input_ids: torch.Tensor):
        hidden = self.encoder(self.embeddings(input_ids))
        return hidden if self.pooler is None else (hidden, self.pooler(hidden))

    @staticmethod
    def config_from_shapes(shapes: dict) -> dict:
        config = {"pooler": "pooler.dense.weight" in shapes}
        words = "embeddings.word_embeddings.weight"
        sizes = {"vocab_size": (words, 0), "hidden": (words, 1),
                 "max_positions": ("embeddings.position_embeddings.weight", 0),
                 "type_vocab_size": ("embeddings.token_type_embeddings.weight", 0),
                 "intermediate": ("encoder.layer.0.intermediate.dense.weight", 0)}
        for key, (name, axis) in sizes.items():
            if len(shapes.get(name, ())) == 2:
                config[key] = shapes[name][axis]
        layers = {name.split(".")[2] for name in shapes if name.startswith("encoder.layer.")}
        if layers:
            config["layers"] = len(layers)
        return config
