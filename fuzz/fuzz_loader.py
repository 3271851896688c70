"""Coverage-guided fuzzing of lorakit's file loaders with atheris (libFuzzer).

    python fuzz/fuzz_loader.py -max_total_time=60

Any exception other than lorakit.LoraFileError is a bug and stops the run with the crashing input saved.
"""

import json
import sys
import tempfile
from pathlib import Path

import atheris

import torch
from torch import nn

with atheris.instrument_imports(include=["lorakit"]):  # instrument our code, not torch
    import lorakit as lk
    from lorakit.files import safetensors as safetensors_io
    from lorakit.saving import layer_tensors

LAYER = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2))
TMP = Path(tempfile.mkdtemp())


def test_one(data: bytes) -> None:
    path = TMP / "a.safetensors"
    path.write_bytes(data)  # the library reads files, not bytes
    try:
        safetensors_io.read(path)
    except lk.LoraFileError:
        pass
    try:
        LAYER.load_adapter(path)
    except lk.LoraFileError:
        pass


def main() -> None:
    seed_dir = TMP / "corpus"
    seed_dir.mkdir()
    tensors = layer_tensors(LAYER)
    meta = {"format": "lorakit-layer", "layer": "LoraLinear", "config": json.dumps(LAYER.config.to_dict())}
    safetensors_io.write(seed_dir / "valid", tensors, meta)
    torch.set_num_threads(1)
    atheris.Setup(sys.argv + [str(seed_dir)], test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
