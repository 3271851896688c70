"""EngineSampler: GRPO's rollouts from the serving engine sample what lorakit's generation samples, from the live
weights of the adapter being trained, and leave the model as the trainer needs it (mode, adapter, autograd)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.align.rollouts import EngineSampler, rollout_stop_ids
from lorakit.errors import LoraStateError
from lorakit.generation.decode import generate_ids
from lorakit.generation.sampling import SamplingParams
from lorakit.hf import checkpointing

PROMPTS = [[2, 5, 6, 7], [2, 9], [2, 11, 12, 13, 14, 15]]  # unequal lengths: the prefill pads on the left
SAMPLING = {"temperature": 0.9, "top_p": 0.95, "top_k": 20}
NEW = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Ops this small only pay for thread hand-offs (many times slower on a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    import _hf_models

    return _hf_models.tokenizer(bos=True, chat=True)


@pytest.fixture(scope="module")
def base(tok):
    """A tiny random Llama over the chat tokenizer's vocabulary, with a 'default' adapter whose B is not zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = lk.apply_lora(LlamaForCausalLM(config), lk.LoraConfig(rank=4, alpha=8.0), ["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def oracle(model, stops, seed, n=3, **sampling):
    """Each request with its own params and generator in lorakit's generation loop (`lorakit generate` and
    `predict`'s), request k of prompt-major order seeded seed + k."""
    prompts = [p for p in PROMPTS for _ in range(n)]
    params = [
        SamplingParams(max_tokens=NEW, seed=seed + k, stop_token_ids=stops, **sampling) for k in range(len(prompts))
    ]
    return generate_ids(model, prompts, params, pad_id=0)


def test_rollouts_are_what_generation_samples_per_request(model, tok):
    sampler = EngineSampler(model, tok, max_new_tokens=NEW, max_batch=4, **SAMPLING)  # 9 rows, 4 at a time
    got = sampler(PROMPTS, n=3, seed=123)
    assert got == oracle(model, sampler.stop_token_ids, 123, **SAMPLING)
    assert len(got) == 9 and all(1 <= len(c) <= NEW for c in got)
    assert sampler(PROMPTS, n=3, seed=123) == got  # the same seed: the same completions
    assert sampler(PROMPTS, n=3, seed=124) != got
    with lk.disable_adapters(model):  # the adapter's weights, not the base's, were sampled
        assert oracle(model, sampler.stop_token_ids, 123, **SAMPLING) != got


def test_greedy_rollouts_follow_the_live_weights(model, tok):
    sampler = EngineSampler(model, tok, max_new_tokens=NEW, temperature=0.0, top_p=1.0, top_k=0)
    before = sampler(PROMPTS, n=2, seed=0)
    assert before == oracle(model, sampler.stop_token_ids, 0, n=2, temperature=0.0)
    with torch.no_grad():  # what an optimizer step does: the same tensors, changed in place
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    after = sampler(PROMPTS, n=2, seed=0)
    assert after == oracle(model, sampler.stop_token_ids, 0, n=2, temperature=0.0)
    assert after != before


def test_backward_after_rollouts_with_checkpointing_and_modes_restored(model, tok, tmp_path):
    lk.load_adapters(model, _saved(model, tmp_path), name="reference")  # a second adapter: rollouts use the active one
    checkpointing.enable(model)
    model.train()
    model.model.layers[1].eval()  # a caller's mixed modes come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    sampler = EngineSampler(model, tok, max_new_tokens=NEW, **SAMPLING)
    ids = torch.tensor(PROMPTS[0])[None]
    with torch.enable_grad():  # the trainer's objective samples inside its grad-enabled step
        sampler(PROMPTS, n=2, seed=1)
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert lk.active_adapter(model) == "default"
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])


def test_rollouts_from_a_named_adapter_leave_the_active_one(model, tok, tmp_path):
    directory = _saved(model, tmp_path)
    reference = copy.deepcopy(model)
    lk.load_adapters(model, directory, name="reference")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and "stash" not in name:
                p.mul_(-1.0)  # the active 'default' now differs from the saved 'reference' (stashed)
    sampler = EngineSampler(model, tok, max_new_tokens=NEW, adapter="reference", **SAMPLING)
    assert sampler(PROMPTS, n=2, seed=7) == oracle(reference, sampler.stop_token_ids, 7, n=2, **SAMPLING)
    assert lk.active_adapter(model) == "default"


def test_a_ddp_wrapped_model_samples_its_module(model, tok, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        sampler = EngineSampler(wrapped, tok, max_new_tokens=NEW, **SAMPLING)
        assert sampler.model is model
        assert sampler(PROMPTS[:1], n=2, seed=3) == EngineSampler(model, tok, max_new_tokens=NEW, **SAMPLING)(
            PROMPTS[:1], n=2, seed=3
        )
    finally:
        dist.destroy_process_group()


def test_stop_ids_are_the_eos_and_the_templates_end_of_turn(model, tok):
    plain = copy.deepcopy(tok)
    plain.eos_token = "</s>"  # a tokenizer whose EOS is not the template's <|im_end|>
    model.generation_config.eos_token_id = None
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert rollout_stop_ids(model, plain) == (plain.eos_token_id, end_of_turn)
    assert rollout_stop_ids(model, tok) == (end_of_turn,)
    # a completion that draws a stop id ends with it
    free = EngineSampler(model, tok, max_new_tokens=NEW, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=())
    third = free(PROMPTS[:1], n=1, seed=0)[0][2]
    stopped = EngineSampler(model, tok, max_new_tokens=NEW, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=[third])
    completion = stopped(PROMPTS[:1], n=1, seed=0)[0]
    assert completion[-1] == third and len(completion) == completion.index(third) + 1 <= 3


def test_bad_arguments_are_named(model, tok):
    with pytest.raises(ValueError, match="max_tokens=0"):
        EngineSampler(model, tok, max_new_tokens=0, **SAMPLING)
    with pytest.raises(ValueError, match="max_batch=0"):
        EngineSampler(model, tok, max_new_tokens=NEW, max_batch=0, **SAMPLING)
    with pytest.raises(LoraStateError, match="'nope' is not loaded"):
        EngineSampler(model, tok, max_new_tokens=NEW, adapter="nope", **SAMPLING)
    sampler = EngineSampler(model, tok, max_new_tokens=NEW, **SAMPLING)
    with pytest.raises(ValueError, match="n=0"):
        sampler(PROMPTS, n=0, seed=0)
    with pytest.raises(ValueError, match="over the model's context of 64"):
        sampler([[2] * 60], n=1, seed=0)
    model.train()
    with lk.use_adapter(model, None), pytest.raises(LoraStateError, match="no LoRA adapter is active"):
        sampler(PROMPTS, n=1, seed=0)
    assert model.training


def _saved(model, directory):
    """The model's 'default' adapter saved to `directory`."""
    lk.save_adapters(model, directory)
    return directory


def test_each_prompt_is_prefilled_once(model, tok):
    widths = []  # the rows of every forward that runs more than one position (a prefill)
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(len(kwargs["input_ids"])) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    try:
        EngineSampler(model, tok, max_new_tokens=2, **SAMPLING)(PROMPTS, n=4, seed=0)
    finally:
        hook.remove()
    assert widths == [len(PROMPTS)]  # not 12: the n samples of a prompt share its prefill
