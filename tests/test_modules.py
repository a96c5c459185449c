"""Module discovery: counts, order, kinds, parameter identity, tied weights, peft wrapping, errors."""

import pytest
import torch
from torch import nn

from misa_train.models import tiny_model
from misa_train.modules import (
    ModuleInfo,
    count_parameters,
    embedding_and_head_params,
    find_layer_list,
    find_modules,
    module_sizes,
    norm_params,
)
from tests.helpers_tiny import MODULES_PER_LAYER, TINY_ARCHS, make_tiny

LLAMA_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {a: LLAMA_KINDS for a in ("llama", "qwen2", "mistral", "gemma")} | {
    "gpt2": ["c_attn", "c_proj", "c_fc", "c_proj"]
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_find_modules_counts_order_kinds(arch):
    model, _ = make_tiny(arch)
    mods = find_modules(model)
    n_layers = 2
    assert len(mods) == n_layers * MODULES_PER_LAYER[arch]
    # Layer-major: all of layer 0, then all of layer 1, each in the block's registration order.
    assert [m.layer for m in mods] == sorted(m.layer for m in mods)
    for layer in range(n_layers):
        assert [m.kind for m in mods if m.layer == layer] == KINDS[arch]
    named = dict(model.named_parameters())
    for m in mods:
        assert isinstance(m, ModuleInfo)
        assert named[m.name] is m.param
        assert m.param.dim() == 2 and m.size == m.param.numel()
        assert f".{m.layer}." in m.name


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_module_sizes_and_totals(arch):
    model, _ = make_tiny(arch)
    mods = find_modules(model)
    sizes, layers = module_sizes(mods)
    assert sizes == [m.size for m in mods] and layers == [m.layer for m in mods]
    hidden = 64
    if arch == "gpt2":  # c_attn: h x 3h, c_proj: h x h, c_fc: h x 4h, c_proj: 4h x h
        assert sizes[:4] == [3 * hidden * hidden, hidden * hidden, 4 * hidden * hidden, 4 * hidden * hidden]
    else:  # 4 heads of 16, 2 KV heads, MLP width 2h
        assert sizes[:7] == [hidden * hidden, hidden * 32, hidden * 32, hidden * hidden] + [2 * hidden * hidden] * 3
    assert sum(sizes) < count_parameters(model)


def test_moduleinfo_is_frozen_and_identity_compared():
    model, _ = make_tiny("llama")
    a, b = find_modules(model)[:2]
    with pytest.raises(AttributeError):
        a.layer = 5  # type: ignore[misc]
    assert a != b and a == a


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tied_embeddings_deduplicated(arch):
    model, _ = make_tiny(arch)
    eh = embedding_and_head_params(model)
    assert eh.tied and eh.head == []
    emb = model.get_input_embeddings().weight
    assert eh.embeddings[0] is emb
    assert model.get_output_embeddings().weight is emb
    # GPT-2 also has learned position embeddings outside the blocks.
    assert len(eh.embeddings) == (2 if arch == "gpt2" else 1)
    listed = [p for _, p in model.named_parameters(remove_duplicate=False)]
    unique = {id(p): p.numel() for p in listed}
    assert count_parameters(model) == sum(unique.values())
    # The tied head is counted once: the total is less than the sum with duplicates.
    assert count_parameters(model) == sum(p.numel() for p in listed) - emb.numel()


def test_untied_head_is_listed_separately():
    model = tiny_model("llama", tie_word_embeddings=False)
    eh = embedding_and_head_params(model)
    assert not eh.tied
    assert eh.head == [model.get_output_embeddings().weight]
    assert eh.embeddings == [model.get_input_embeddings().weight]
    tied = tiny_model("llama")
    assert count_parameters(model) - count_parameters(tied) == 262 * 64


def test_norm_params_llama_and_gpt2():
    llama, _ = make_tiny("llama")
    # input + post-attention norm per layer, plus the final norm; RMSNorm has a weight only.
    assert len(norm_params(llama)) == 2 * 2 + 1
    gpt2, _ = make_tiny("gpt2")
    assert len(norm_params(gpt2)) == 2 * (2 * 2 + 1)  # LayerNorm: weight and bias
    ids = [id(p) for p in norm_params(llama)]
    assert len(ids) == len(set(ids))


def test_count_parameters_trainable_only():
    model, _ = make_tiny("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    mods = find_modules(model)
    mods[0].param.requires_grad_(True)
    assert count_parameters(model, trainable_only=True) == mods[0].size


def test_no_modules_error():
    with pytest.raises(ValueError, match="no decoder-layer linear weights found in Sequential"):
        find_modules(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))

    class NormsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(4) for _ in range(3)])

    with pytest.raises(ValueError, match="no decoder-layer linear weights found in NormsOnly"):
        find_modules(NormsOnly())


def test_layer_list_is_largest_homogeneous_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
            self.out = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([Block() for _ in range(2)])
            self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 2)])

    name, layers = find_layer_list(Net())
    assert name == "h" and len(layers) == 2
    mods = find_modules(Net())
    assert [m.kind for m in mods] == ["0", "1", "2", "out"] * 2
    assert [m.layer for m in mods] == [0] * 4 + [1] * 4


def test_peft_wrapped_model_reports_base_weights():
    peft = pytest.importorskip("peft")
    model, _ = make_tiny("llama")
    base_mods = find_modules(model)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    wrapped = peft.get_peft_model(model, cfg)
    mods = find_modules(wrapped)
    assert [m.kind for m in mods] == [m.kind for m in base_mods]
    assert all(a.param is b.param for a, b in zip(mods, base_mods, strict=True))
    named = dict(wrapped.named_parameters())
    assert all(named[m.name] is m.param for m in mods)
    assert any(".base_layer." in m.name for m in mods)
    assert not any("lora_" in m.name for m in mods)


def test_find_modules_skips_shared_weights():
    model, _ = make_tiny("llama")
    layers = model.model.layers
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight
    mods = find_modules(model)
    assert len(mods) == 13
    assert sum(1 for m in mods if m.param is layers[0].self_attn.q_proj.weight) == 1
    assert isinstance(mods[0].param, torch.nn.Parameter)
