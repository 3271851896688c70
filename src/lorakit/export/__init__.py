"""Exporting a fine-tuned model or adapter to edge runtimes (ONNX Runtime, llama.cpp)."""
