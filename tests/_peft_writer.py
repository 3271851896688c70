"""Write PEFT `target_parameters` adapters of the tiny MoE models with whatever PEFT this Python imports.

    python _peft_writer.py OUT '[{"name": ..., "family": ..., "target_parameters": [...], "r": 2, "alpha": 4}]'

Run as a child with PEFT 0.18.1 first on PYTHONPATH (tests/_peft018.py), it writes adapters in PEFT's pre-0.19
layout. Per job: OUT/NAME (save_pretrained) and OUT/NAME.outputs.safetensors holding `base` and `adapted` logits of
`_peft_writer.IDS`, and `delta.<parameter>` (PEFT's own get_delta_weight) for each adapted parameter.
"""

import json
import sys
from pathlib import Path

IDS = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 3, 5, 7, 11, 13, 17, 19]]  # token ids every test feeds the models


def write(out: Path, job: dict) -> None:
    """One job: a seeded adapter with random A and B (so it moves the logits), saved with its outputs."""
    import torch
    from _moe_models import BUILDERS
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import ParamWrapper
    from safetensors.torch import save_file

    model = BUILDERS[job["family"]]()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        base = model(ids).logits
    torch.manual_seed(job.get("seed", 1))
    config = LoraConfig(
        r=job["r"],
        lora_alpha=job["alpha"],
        target_modules=[],
        target_parameters=job["target_parameters"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 0.3)
        adapted = peft_model(ids).logits
    outputs = {"base": base, "adapted": adapted}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            outputs[f"delta.{owner}.{module.parameter_name}"] = module.get_delta_weight("default").detach()
    peft_model.save_pretrained(out / job["name"])
    save_file({k: v.contiguous() for k, v in outputs.items()}, out / f"{job['name']}.outputs.safetensors")


if __name__ == "__main__":  # pytest's doctest collection imports this file: only a child Python runs it
    import peft

    print("peft", peft.__version__, flush=True)
    for job in json.loads(sys.argv[2]):
        write(Path(sys.argv[1]), job)
