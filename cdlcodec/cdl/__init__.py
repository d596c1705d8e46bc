"""Coded Deep Learning: probabilistic quantizers, CDL layers, entropy terms and training (CDL paper)."""
