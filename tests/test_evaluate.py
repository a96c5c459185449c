"""Evaluation: answer extraction, token-weighted loss against a manual computation, generation accuracy."""

import math
import re

import pytest
import torch
from torch import nn

from misa_train.data import IGNORE_INDEX, Batches, Example, encode_sft
from misa_train.evaluate import answer_accuracy, answers_match, eval_loss, extract_answer, generate_answers
from tests.helpers_tiny import make_tiny, tiny_batches, tiny_examples


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### $5.", "5"),
        ("The answer is $18.", "18"),
        ("x = -3.5, so -7 then 12.5.", "12.5"),
        ("#### -42 apples, not 7", "-42"),
        ("first #### 3 then #### 4", "4"),
        ("#### none here but 9 earlier? no: 9", "9"),
        ("no numbers at all", None),
        ("", None),
        (None, None),
        ("costs $1,000,000.00 total", "1000000.00"),
        ("ends with period 7.", "7"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_match_numeric_tolerance():
    assert answers_match("72", "72.0")
    assert answers_match("1e3", "1000")
    assert answers_match("0.1", "0.10000000001")
    assert not answers_match("72", "73")
    assert not answers_match(None, "1")
    assert not answers_match("nan", "1")


def _manual_loss(model, batches):
    """Per-token loop: sum over label positions t >= 1 of -log p(y_t | x_<t), divided by the count."""
    nll, count = 0.0, 0
    model.eval()  # GPT-2 has dropout: the reference must see the same deterministic forward
    with torch.no_grad():
        for b in batches:
            logp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
            for i in range(b["input_ids"].shape[0]):
                for t in range(1, b["input_ids"].shape[1]):
                    y = int(b["labels"][i, t])
                    if y != IGNORE_INDEX:
                        nll -= float(logp[i, t - 1, y])
                        count += 1
    return nll / count, count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eval_loss_matches_manual(arch):
    model, tok = make_tiny(arch)
    batches = tiny_batches(tok, n=7, batch_size=3)  # uneven batches: weighting by tokens matters
    res = eval_loss(model, batches)
    manual, count = _manual_loss(model, list(batches))
    assert res["tokens"] == count
    assert res["loss"] == pytest.approx(manual, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(manual), rel=1e-5)
    # The HF mean loss of a single batch is the same quantity.
    (one,) = list(tiny_batches(tok, n=3, batch_size=3))
    with torch.no_grad():
        hf = model(**one).loss
    assert eval_loss(model, [one])["loss"] == pytest.approx(float(hf), rel=1e-5)


def test_eval_loss_restores_mode_no_grad_and_max_batches():
    model, tok = make_tiny("llama")
    batches = tiny_batches(tok, n=8, batch_size=2)
    model.train()
    eval_loss(model, batches)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    first = eval_loss(model, batches, max_batches=1)
    assert not model.training
    assert first["tokens"] == eval_loss(model, list(batches)[:1])["tokens"]
    assert math.isnan(eval_loss(model, [])["loss"])


class _Oracle(nn.Module):
    """Stands in for a model: answers 'What is a plus b?' with a+b (wrong on purpose when a is odd)."""

    def __init__(self, tok):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.tok = tok
        self.generation_config = None
        self.seen_left_padding = False

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        assert kw["do_sample"] is False
        # Left padding: every row's last position is a real token; pads only at the front.
        assert bool(attention_mask[:, -1].all())
        self.seen_left_padding |= bool((attention_mask[:, 0] == 0).any())
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tok.decode(ids[mask.bool()])
            a, b = map(int, re.search(r"What is (\d+) plus (\d+)", prompt).groups())
            ans = a + b + (a % 2)
            rows.append(self.tok(f"{a}+{b}={ans} #### {ans}<|end|>", add_special_tokens=False)["input_ids"])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)


def test_answer_accuracy_counts_numeric_matches_with_left_padding():
    _, tok = make_tiny("llama")
    examples = tiny_examples(10)  # a = 2..11: even a (5 of them) answered correctly
    oracle = _Oracle(tok)
    res = answer_accuracy(oracle, tok, examples, max_new_tokens=32, batch_size=4, n_samples=3)
    assert res["n"] == 10 and res["accuracy"] == pytest.approx(0.5)
    assert oracle.seen_left_padding
    assert len(res["samples"]) == 3
    s0 = res["samples"][0]
    assert s0["prompt"] == "What is 2 plus 1?" and s0["target"] == "3" and s0["predicted"] == "3" and s0["correct"]
    assert res["samples"][1]["correct"] is False
    assert tok.padding_side == "right"  # the tokenizer is not left modified
    assert answer_accuracy(oracle, tok, [], 8)["n"] == 0


def test_generation_uses_training_prompt_ids():
    model, tok = make_tiny("qwen2")
    ex = [Example("What is 2 plus 2?", "4"), Example("Longer question: what is 10 plus 20?", "30")]
    outs = generate_answers(model, tok, ex, max_new_tokens=4, batch_size=2)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    # The greedy continuation of the shorter, left-padded prompt equals its unpadded continuation.
    alone = generate_answers(model, tok, ex[:1], max_new_tokens=4, batch_size=1)
    assert alone[0] == outs[0]
    enc = encode_sft(tok, ex[:1], 64)[0]
    n_prompt = sum(1 for x in enc["labels"] if x == IGNORE_INDEX)
    assert tok.decode(enc["input_ids"][:n_prompt]).endswith("<|assistant|>")


def test_tiny_model_learns_to_lower_eval_loss():
    """A few full-model Adam steps on the batches lower eval_loss: loss, masks and batches fit together."""
    model, tok = make_tiny("llama")
    enc = encode_sft(tok, tiny_examples(8), 128)
    train = Batches(enc, 4, seed=0, pad_token_id=tok.pad_token_id)
    val = tiny_batches(tok, n=8, batch_size=4)
    before = eval_loss(model, val)["loss"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss = model(**next(train)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert eval_loss(model, val)["loss"] < before - 0.5
