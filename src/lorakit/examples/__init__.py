"""Runnable examples; `lorakit example` runs the MLP one (mlp_example.py)."""
