"""Export a model with its adapters merged to an edge runtime's format, proven by reloading it in that runtime.

After hf/ and serve/ in the data flow; only cli/ imports it. `onnx.py` writes an ONNX model (torch's exporter)
and `proof.py` checks it in onnxruntime against lorakit's own, unmerged forward pass.
"""
