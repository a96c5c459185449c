"""Offline model loading and the tiny fixtures (no network, no SmolLM2 here: see test_smollm2.py)."""

import pytest
import torch

from misa_train.models import TINY_ARCHS, cache_dir, load_model, tiny_model, tiny_tokenizer
from tests.helpers_tiny import make_tiny


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_forward_and_determinism(arch):
    model, tok = make_tiny(arch)
    ids = torch.tensor([tok("12+3=15")["input_ids"]])
    out = model(input_ids=ids).logits
    assert out.shape == (1, ids.shape[1], len(tok))
    again = tiny_model(arch)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                  strict=True))


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_seed_changes_weights_and_bad_arch():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_model("bert")


def test_make_tiny_returns_independent_copies():
    m1, _ = make_tiny("llama")
    m2, _ = make_tiny("llama")
    with torch.no_grad():
        m1.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(m1.model.layers[0].mlp.up_proj.weight, m2.model.layers[0].mlp.up_proj.weight)


def test_tiny_tokenizer_bytes_specials_and_template():
    tok = tiny_tokenizer()
    text = "Hello, 12 + 3 = 15 é!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: no merges
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 1, 262)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|user|>hi<|end|>\n<|assistant|>"
    assert tok("<|user|>hi", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("<|user|>")
    assert not tiny_tokenizer(chat_template=False).chat_template


def test_load_model_missing_is_one_line_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found locally") as e:
        load_model("no-such-org/no-such-model-xyz")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not found locally"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not found locally"):
        load_model(str(tmp_path / "missing.gguf"))


def test_load_model_names_a_corrupt_config_json(tmp_path):
    folder = tmp_path / "m"
    model, tok = make_tiny("llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "llama", ')  # cut short, as by a full disk
    with pytest.raises(ValueError) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert "config.json is corrupt" in msg and str(folder) in msg and "not found" not in msg
    assert "\n" not in msg
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(folder))


def test_load_model_local_folder_roundtrip(tmp_path):
    model, tok = make_tiny("qwen2")
    tok = tiny_tokenizer()
    tok.pad_token = None  # load_model must fill it in with eos
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert ltok.pad_token == ltok.eos_token == "<|end|>"
    assert next(loaded.parameters()).dtype == torch.bfloat16
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.allclose(v.float(), ref[k].to(torch.bfloat16).float())


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MISA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("MISA_CACHE")
    assert cache_dir().parts[-3:] == (".cache", "misa", "smollm2-135m-instruct")
