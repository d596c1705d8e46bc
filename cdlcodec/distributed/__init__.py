"""Compressed communication for torch.distributed: CO3 gradient hook and coded tensor exchange."""
