"""LoRA layers' structure: which modules the layers reach, one adapter set per layer, one name per concept."""

from pathlib import Path

from torch import nn

import lorakit as lk


def _imports(module: str) -> set[str]:
    """The lorakit modules `module`'s source imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for a in node.names:  # `from . import ops` names a module, `from .adapter_set import X` a name in one
                out.add(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("lorakit.") and _is_module(m)}


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `from .adapter_set import check_adapter_name`: a name, not a module
        return False


def test_layers_reach_no_model_level_module():
    """Regression: LoraLayer.save_adapter/load_adapter imported lorakit.saving/.loading inside their bodies, a
    cycle layers -> saving/loading -> layers. The layer file is the layers' own business (via files/)."""
    seen, todo = set(), ["lorakit.layers"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module))
    assert "lorakit.files.layer_file" in seen  # the one-layer file goes through files/ ...
    assert not seen & {"lorakit.saving", "lorakit.loading", "lorakit.model", "lorakit.adapters"}  # ... and only


def test_a_layers_adapter_set_is_one_declared_object():
    """Regression: the layer's adapter collection was a new view built on every attribute access."""
    layer = lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=2))
    assert layer.adapters is layer.adapters and "adapters" in vars(layer)
    layer.adapters.add("other", lk.LoraConfig(rank=1))
    assert layer.adapters.names() == ["default", "other"]


def test_one_name_per_concept_base_of_and_no_plain():
    """`layers.base_of` is the one way to the frozen base of a maybe-wrapped module, and no two functions share the
    name `_plain` (each says what it does)."""
    import ast
    from pathlib import Path

    from lorakit.layers import base_of

    base = nn.Linear(4, 4)
    assert base_of(lk.with_lora(base, lk.LoraConfig(rank=2))) is base and base_of(base) is base
    src = Path(lk.__file__).parent
    files = {str(p.relative_to(src)): p.read_text() for p in src.rglob("*.py")}
    plain = [
        f
        for f, text in files.items()
        if any(isinstance(n, ast.FunctionDef) and n.name == "_plain" for n in ast.walk(ast.parse(text)))
    ]
    assert not plain, plain
    unwrapping = [f for f, text in files.items() if ".base if isinstance(" in text and f != "layers.py"]
    assert not unwrapping, unwrapping
