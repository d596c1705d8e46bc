"""The small MLP of the built-in ``mlp-digits`` task (8x8 digits, 64 inputs, 10 classes).

Each ReLU is its own module so that CDL conversion gives every activation its own quantizer.
"""
from __future__ import annotations

from ..optional import require
require("torch", "the digits-MLP task")
from torch import nn


class DigitsMLP(nn.Module):
    example_input_shape = (1, 64)  # lets the encoder export its ONNX graph (cdlcodec.io.onnx_model)

    def __init__(self, hidden: tuple[int, int] = (64, 32), num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))
