"""Adapter files: safetensors, PEFT's directory layout, lorakit's one-layer files, inspection, atomic writes.

This package moves tensors and JSON only; it never imports model code (layers, model, adapters).
"""
