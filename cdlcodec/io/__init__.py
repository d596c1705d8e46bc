"""Model files in and out: one adapter per kind of file.

Readers turn a model file into `TensorRecord`s (plus a graph, where the file has one); writers turn
decoded records back into a file. The rest of the pipeline never asks where a tensor came from.
"""
