"""Generating tokens with a causal LM: the one sampler, the left-padded KV-cache batch, and a plain decode loop.

`sampling` is the sampler every generation path draws with (`lorakit generate`, `lorakit predict`, the server's
engine); `kv.Batch` holds a batch's KV cache; `decode.generate_ids` runs a fixed batch to its end. This package
sits below hf/ and serve/ and imports neither.
"""
