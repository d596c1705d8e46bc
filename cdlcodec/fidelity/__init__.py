"""Encode to a fidelity target: the smallest container whose decoded model still does its job.

The pieces, in the order the encoder uses them (docs/fidelity.md):
- `inputs`: calibration inputs (an .npz named after the graph's inputs) or, without them, inputs
  generated from the graph's declared types and shapes (reported as weaker evidence);
- `roles`: which tensors are weights worth quantizing, read from the graph (the consuming op's input
  slot), not from the tensor's rank;
- `runner`: runs an ONNX graph with onnxruntime, with any subset of its weights replaced;
- `measures`: output fidelity (cosine, top-1 agreement, relative MSE) and the target to meet;
- `gptq`: error-compensating rounding for MatMul / Gemm weights (GPTQ/OPTQ with H = XᵀX);
- `allocate`: per-tensor steps by equal rate-distortion slope, distortion measured at the output;
- `search`: the loop that picks the largest distortion budget whose decoded model meets the target.
"""
