"""Shared tiny-model fixtures for fast CPU tests (import these; nothing is downloaded).

    from tests.helpers_tiny import make_tiny, TINY_ARCHS
    model, tok = make_tiny("llama")          # fresh copy each call: safe to train/mutate

Models: random-init llama / qwen2 / mistral / gemma (2 layers x 7 modules) and gpt2 (2 layers x 4 modules),
hidden 64, vocab 262 = the byte-level ``tiny_tokenizer`` (pad id 0, eos id 1, chat template).
Built once per process and deep-copied, so one test's training never leaks into another.
"""

from __future__ import annotations

import copy
from functools import cache

from misa_train.models import TINY_ARCHS, tiny_model, tiny_tokenizer

__all__ = [
    "TINY_ARCHS",
    "MODULES_PER_LAYER",
    "make_tiny",
    "make_tokenizer",
    "tiny_qa_records",
    "tiny_examples",
    "tiny_batches",
]

# Linear/Conv1D weights per decoder block for each tiny architecture.
MODULES_PER_LAYER = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "gpt2": 4}


@cache
def _cached_model(arch: str, num_layers: int, seed: int):
    return tiny_model(arch, num_layers=num_layers, seed=seed)


@cache
def _cached_tokenizer(chat_template: bool):
    return tiny_tokenizer(chat_template=chat_template)


def make_tokenizer(chat_template: bool = True):
    """A private copy of the tiny byte-level tokenizer (tests may flip padding_side safely)."""
    return copy.deepcopy(_cached_tokenizer(chat_template))


def make_tiny(arch: str = "llama", num_layers: int = 2, seed: int = 0, chat_template: bool = True):
    """``(model, tokenizer)``: a fresh deep copy of a cached tiny model (train mode, fp32, CPU)."""
    model = copy.deepcopy(_cached_model(arch, num_layers, seed))
    model.train()
    return model, make_tokenizer(chat_template)


def tiny_qa_records(n: int = 8) -> list[dict]:
    """``n`` short GSM8K-style records ``{"question", "answer"}`` with answers ``'... #### <number>'``."""
    out = []
    for i in range(n):
        a, b = i + 2, 3 * i + 1
        out.append({"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}={a + b} #### {a + b}"})
    return out


def tiny_examples(n: int = 8):
    """The records of ``tiny_qa_records`` as ``misa_train.data.Example`` objects."""
    from misa_train.data import Example

    return [Example(prompt=r["question"], response=r["answer"]) for r in tiny_qa_records(n)]


def tiny_batches(tokenizer, n: int = 8, batch_size: int = 4, seed: int = 0, max_seq_len: int = 128):
    """A one-pass, unshuffled ``Batches`` over ``n`` tokenised tiny SFT examples (prompt labels masked)."""
    from misa_train.data import Batches, encode_sft

    encoded = encode_sft(tokenizer, tiny_examples(n), max_seq_len)
    return Batches(encoded, batch_size, seed=seed, pad_token_id=tokenizer.pad_token_id, shuffle=False,
                   repeat=False)
