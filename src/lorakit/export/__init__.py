"""The fine-tuned model in an edge runtime's format, proven by running it in that runtime.

After hf/ and serve/ in the data flow; only cli/ imports it.

- `prepare.py`: the base with its adapters loaded unmerged (every proof's reference), what export refuses.
- `onnx.py`: the merged model's logits as an ONNX graph (torch's exporter), proven in onnxruntime.
- `gguf_model.py`, `gguf_adapter.py`: llama.cpp's GGUF files, the merged model and the adapter alone, as its
  own converters write them; `gguf_vocab.py`: the tokenizer and the pre-tokenizer llama.cpp must run; `gguf.py`
  writes them for an export and proves them in llama.cpp (llama-cpp-python).
- `proof.py`: the comparison of an artefact's logits with lorakit's, and `proof.json`.
"""
